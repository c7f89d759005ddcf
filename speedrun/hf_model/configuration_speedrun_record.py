"""Configuration of the speedrun's record-recipe GPT (modded-nanogpt record #89) for transformers."""
from transformers import PretrainedConfig


class SpeedrunRecordConfig(PretrainedConfig):
    model_type = "speedrun_record"
    attribute_map = {"hidden_size": "model_dim"}

    def __init__(self, vocab_size=50304, model_dim=768, head_dim=128, bigram_vocab=377280,
                 bigram_sign_rows=8192, max_seq_len=4096, windows=(768, 2560),
                 rotary_history=(384, 896, 1408, 1664), eot_token_id=50256, text_vocab_size=50257,
                 use_cache=False, **kwargs):
        self.vocab_size = vocab_size            # rows of the embedding/head (50257 padded to x128)
        self.model_dim = model_dim              # 6 heads x head_dim; 11 layers (the recipe's layout)
        self.head_dim = head_dim
        self.num_hidden_layers = 11
        self.num_attention_heads = 6
        self.bigram_vocab = bigram_vocab        # rows of the hashed bigram table
        self.bigram_sign_rows = bigram_sign_rows
        self.max_seq_len = max_seq_len          # longest input (rotary table rows)
        self.windows = list(windows)            # (short, long) attention windows in tokens, as validated
        self.rotary_history = list(rotary_history)   # long windows whose YaRN steps set the rotary state
        self.eot_token_id = eot_token_id        # <|endoftext|>: starts every document
        self.text_vocab_size = text_vocab_size  # ids >= this are padding rows, never real tokens
        self.use_cache = use_cache              # no KV cache: every step recomputes the sequence
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("bos_token_id", eot_token_id)
        kwargs.setdefault("eos_token_id", eot_token_id)
        super().__init__(**kwargs)
