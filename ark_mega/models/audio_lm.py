"""AudioLM: audio encoder + adapter + megatron GPT decoder, one pipeline stage of it.

The encoder lives on the first pipeline stage with the embedding; its output replaces the
embeddings of the audio placeholder tokens, in order of appearance. The decoder takes either a
padded batch (`input_ids` [b, s], right padding) or a packed one (`input_ids` [1, t] with
`cu_seqlens`: no attention across utterances, RoPE positions restart per utterance).

`ctc_head=True` adds a training aid for models trained from scratch: a linear CTC head on the
audio embeddings (joint CTC / attention training, as in ESPnet and WeNet). It is not part of
the model's config, so exports and inference leave it out.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from .attention import rope_in_core_attention, rope_inputs
from .audio_encoders import packed_seq_params
from .config import AudioLMConfig
from .megatron_config import decoder_config, encoder_config
from .specs import decoder_layer_spec, use_transformer_engine


class AudioLM(MegatronModule):
    def __init__(self, cfg: AudioLMConfig, dtype: torch.dtype = torch.float32,
                 pre_process: bool | None = None, post_process: bool | None = None,
                 transformer_impl: str = "auto", fp8: str | None = None, ctc_head: bool = False,
                 recompute: str = "none", recompute_encoder: bool = False):
        """`recompute` (none | selective | full): the decoder's activation recomputation;
        `recompute_encoder`: the audio encoder's layers recomputed in full."""
        dec = cfg.decoder
        use_te = use_transformer_engine(transformer_impl, fp8)
        config = decoder_config(dec, dtype, fp8, recompute)
        super().__init__(config=config)
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage()
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage()
        self.cfg = cfg
        self.transformer_impl = "transformer_engine" if use_te else "local"  # what was built
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            from .families import family  # families imports this package

            enc_config = encoder_config(cfg.encoder, dtype, fp8,
                                        "full" if recompute_encoder else "none")
            self.encoder = family(cfg.family).encoder(cfg, enc_config, use_te)
        # the CTC head's classes: the vocabulary, then the blank (id vocab_size)
        self.ctc_head = (torch.nn.Linear(dec.hidden_size, dec.vocab_size + 1)
                         if ctc_head and pre_process else None)
        self.gpt = GPTModel(
            config=config,
            transformer_layer_spec=decoder_layer_spec(dec.qk_norm, use_te),
            vocab_size=dec.vocab_size,
            max_sequence_length=dec.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=dec.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=dec.rotary_base,
        )
        self.rope_in_core_attention = rope_in_core_attention(self.gpt.decoder)
        # megatron's norm wrappers ignore params_dtype and make fp32 weights: a bf16 model would
        # then mix dtypes, which the optimizers' checkpoints cannot shard (and torch's fused
        # RMSNorm refuses, falling back to fp32 intermediates)
        for param in self.parameters():
            param.data = param.data.to(dtype)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input here (megatron schedules)."""
        self.gpt.set_input_tensor(input_tensor)

    def embed(self, input_ids: torch.Tensor, audio_features: list[torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """Token embeddings [s, b, h] with audio embeddings at the placeholder positions; the
        audio embeddings [sum(tokens), h] and the token count of each utterance."""
        emb = self.gpt.embedding(input_ids=input_ids, position_ids=None)
        if not audio_features:
            return emb, None, []
        audio, counts = self.encoder(audio_features)
        is_audio = (input_ids == self.cfg.audio_token_id).transpose(0, 1)  # [s, b] like emb
        # Placeholders are filled in batch-major order of appearance, utterance by utterance.
        order = is_audio.transpose(0, 1).reshape(-1).nonzero().squeeze(-1)
        if order.numel() != audio.shape[0]:
            raise ValueError(f"{order.numel()} audio placeholder tokens for {audio.shape[0]} "
                             f"audio embeddings")
        s, b = is_audio.shape
        flat = emb.transpose(0, 1).reshape(b * s, -1).clone()
        flat[order] = audio.to(flat.dtype)
        return flat.reshape(b, s, -1).transpose(0, 1).contiguous(), audio, counts

    def ctc_log_probs(self, audio: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The CTC head's log-probabilities [max(counts), n, vocab + 1] (time-major, padded)."""
        logits = self.ctc_head(audio).float()
        per_utt = torch.nn.utils.rnn.pad_sequence(list(logits.split(counts)))
        return per_utt.log_softmax(-1)

    def forward(self, input_ids: torch.Tensor | None,
                audio_features: list[torch.Tensor] | None = None,
                cu_seqlens: torch.Tensor | None = None,
                return_hidden: bool = False,
                attention_mask: torch.Tensor | None = None,
                inference_context=None, return_ctc: bool = False):
        """Vocab-parallel logits [s, b, V/tp] on the last stage (or the final hidden states
        [s, b, h] with `return_hidden`); the hidden states to send on, elsewhere. `return_ctc`
        (one pipeline stage, a model with a CTC head) returns `(output, (ctc_log_probs,
        audio_token_counts))`.

        `input_ids` is [b, s]; packed input is [1, t] with `cu_seqlens` [n + 1]. Generation
        passes a megatron `inference_context` (KV cache) and a boolean `attention_mask`
        [b, 1, s, kv] that is True where attention is blocked (left padding).
        """
        packed = packed_seq_params(cu_seqlens) if cu_seqlens is not None else None
        decoder_input = audio = None
        if self.pre_process:
            decoder_input, audio, counts = self.embed(input_ids, audio_features)
        if inference_context is not None:
            rope_len = inference_context.max_sequence_length
        elif packed is not None:
            rope_len = packed.max_seqlen_q
        else:
            rope_len = input_ids.shape[1] if input_ids is not None else self._input_len()
        packed, rotary = rope_inputs(packed, self.gpt.rotary_pos_emb(rope_len),
                                     self.config.params_dtype, self.rope_in_core_attention)
        hidden = self.gpt.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                                  rotary_pos_emb=rotary, packed_seq_params=packed,
                                  inference_context=inference_context)
        if not self.post_process or return_hidden:
            output = hidden
        else:
            if inference_context is not None and inference_context.materialize_only_last_token_logits:
                hidden = hidden[-1:]  # generation reads the last position only: no [s, b, V] prefill
            output = self.logits(hidden)
        if return_ctc:
            if self.ctc_head is None or not self.post_process or audio is None:
                raise ValueError("return_ctc needs a model with a CTC head, audio input and one "
                                 "pipeline stage")
            return output, (self.ctc_log_probs(audio, counts), counts)
        return output

    def output_weight(self) -> torch.Tensor:
        """This rank's vocabulary shard of the output layer [V/tp, h] (last stage)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.gpt.output_layer.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.gpt.output_layer(hidden, weight=self.output_weight())
        return logits

    # The two members megatron's finalize_model_grads reads to sum the gradients of tied
    # embedding / output weights across the first and last pipeline stages.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.gpt.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.gpt.shared_embedding_or_output_weight()

    def _input_len(self) -> int:
        return self.gpt.decoder.input_tensor.shape[0]
