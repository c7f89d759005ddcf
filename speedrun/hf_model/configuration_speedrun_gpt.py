"""Configuration of the speedrun GPT (modded-nanogpt architecture) for Hugging Face transformers."""
from transformers import PretrainedConfig


class SpeedrunGPTConfig(PretrainedConfig):
    model_type = "speedrun_gpt"
    attribute_map = {"hidden_size": "model_dim", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head"}

    def __init__(self, vocab_size=50304, n_layer=12, model_dim=768, n_head=6, head_dim=128,
                 value_embeds=3, no_attn_layer=7, logit_cap=30.0, attn_gate=False, attn_gate_dims=12,
                 bigram_vocab=0, bigram_mults=(36313, 27191), key_offset=False, backout_layer=-1,
                 ve_gates=False, ve_gate_dims=12, n_kv_head=0, window_blocks=14,
                 block_size=128, attn_scale=0.12, smear_gate_dims=12, eot_token_id=50256,
                 text_vocab_size=50257, initializer_range=0.02, use_cache=False, **kwargs):
        self.vocab_size = vocab_size            # rows of the embedding/head (50257 padded to x128)
        self.n_layer = n_layer
        self.model_dim = model_dim
        self.n_head = n_head
        self.head_dim = head_dim
        self.n_kv_head = n_kv_head              # key/value heads (grouped-query attention); 0 = n_head
        self.value_embeds = value_embeds        # value-embedding tables (first and last layers)
        self.no_attn_layer = no_attn_layer      # block without attention; -1: none
        self.logit_cap = logit_cap
        self.attn_gate = attn_gate              # per-head sigmoid gate on attention outputs
        self.attn_gate_dims = attn_gate_dims    # ... read from this many leading input dims
        self.bigram_vocab = bigram_vocab        # rows of the hashed-bigram embedding; 0 = none
        self.bigram_mults = list(bigram_mults)  # its hash: (m0 * token) XOR (m1 * previous token)
        self.key_offset = key_offset            # long-window keys take the previous token's position-free dims
        self.backout_layer = backout_layer      # block whose output is partly subtracted before the head; -1 = none
        self.ve_gates = ve_gates                # per-head sigmoid gates on the value embeddings
        self.ve_gate_dims = ve_gate_dims        # ... read from this many leading input dims
        self.window_blocks = window_blocks      # attention window in blocks of block_size tokens
        self.block_size = block_size
        self.attn_scale = attn_scale
        self.smear_gate_dims = smear_gate_dims
        self.eot_token_id = eot_token_id        # <|endoftext|>: starts every document
        self.text_vocab_size = text_vocab_size  # ids >= this are padding rows, never real tokens
        self.initializer_range = initializer_range
        self.use_cache = use_cache              # no KV cache: every step recomputes the sequence
        kwargs.setdefault("tie_word_embeddings", False)  # the head is untied from the embedding
        kwargs.setdefault("bos_token_id", eot_token_id)
        kwargs.setdefault("eos_token_id", eot_token_id)
        super().__init__(**kwargs)
