"""The speedrun's record-recipe GPT as a transformers causal LM.

The architecture code is the training code itself (model.py and the modules beside it are copied
from speedrun/record/ into the folder), so an exported model computes exactly what the checkpoint
computes: the record's dtypes (bf16 matrices, fp32 lambdas), its rotary state and the windows of
its last validation. Each row of a batch is one sequence of documents (<|endoftext|> starts each);
padding is not supported. There is no KV cache: generation recomputes the sequence every step.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_speedrun_record import SpeedrunRecordConfig
from .model import RecordConfig, RecordGPT


class SpeedrunRecordForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SpeedrunRecordConfig
    base_model_prefix = "model"
    _supports_param_buffer_assignment = False

    def __init__(self, config: SpeedrunRecordConfig):
        super().__init__(config)
        self.model = RecordGPT(RecordConfig(vocab_size=config.vocab_size, model_dim=config.model_dim,
                                            head_dim=config.head_dim, bigram_vocab=config.bigram_vocab,
                                            bigram_sign_rows=config.bigram_sign_rows,
                                            max_seq_len=config.max_seq_len))
        self._ready_on = None
        self.post_init()

    def _init_weights(self, module):   # weights always come from the checkpoint
        pass

    def _prepare(self, device: torch.device) -> None:
        """Rotary tables, windows and the record's dtypes, once per device (not weights: they are
        made here rather than loaded, whatever transformers does with buffers)."""
        if self._ready_on == device:
            return
        self.model.cast_to_record_dtypes()
        self.model.make_execution_state(device, fp8=False)
        self.model.set_rotary(list(self.config.rotary_history))
        self.model.set_windows(*self.config.windows)
        self._ready_on = device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def forward(self, input_ids: torch.LongTensor, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        self._prepare(input_ids.device)
        logits = torch.stack([self.model.sequence_logits(row) for row in input_ids])
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
