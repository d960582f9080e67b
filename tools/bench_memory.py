"""Activation memory of the student's OPD pass, counted in bytes (valid on any device).

    python tools/bench_memory.py                      # ark_asr_0p6b, bf16, one 30 s utterance,
                                                      # each recompute setting
    python tools/bench_memory.py --budget examples/configs/ark_asr_opd.yaml --dp 8 --gpu-gib 80
    python tools/bench_memory.py --transients         # the largest tensors of one SFT step
                                                      # and of a rollout
    python tools/bench_memory.py --smoke              # tiny model: checks the script runs

One forward of the student on a packed utterance (audio placeholders + prompt + 64 answer
tokens) and the OPD loss head at the answer positions (union of 2k ids), with every tensor
autograd saves for backward counted once (`torch.autograd.graph.saved_tensors_hooks`; the
model's parameters are not activations and are left out), split by where it was saved: audio
encoder, decoder, loss head. Reported per decoder token, for `recompute` none, selective and
full (with the encoder recomputed alongside full). The loss head runs its Triton kernels (in the
interpreter on the CPU), so it saves what it saves on a GPU. Byte counts do not depend on the
device, so the CPU measures them; nothing here times anything.

`--transients`: the largest tensors any op makes during one SFT step (forward and backward,
`opd.steps.sft_step`) on the same utterance, with their shapes: those with a token dimension
grow with `data.max_tokens` (the figure per token says by how much); and the largest
logits of a rollout (`opd.generate`) of two copies of it.

`--budget CONFIG`: the per-GPU memory of that run config's OPD step on one GPU of `--dp`
data-parallel ranks (TP = PP = 1), from the parameter counts of its presets and the measured
activations per token at its `student.recompute`: student weights (bf16) + gradients (fp32
main grads) + optimizer (fp32 master and Adam moments, split over DP by the distributed
optimizer) + teacher weights (bf16) + saved activations (per token x data.max_tokens) + the
rollout's KV cache (every utterance of the batch, prompt + max_new_tokens rounded up to
CACHE_BLOCK) as the model keeps it for its last KEPT_STEPS rollout shapes (at most
KEPT_CACHE_BYTES), plus one while a rollout's prefilled cache moves into its step + one layer's
activations rebuilt at a time under recomputation. Transients of the loss paths (chunked
teacher top-k, sparse student head) are small beside these and left out.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # the loss-head kernels, also on the CPU

import torch  # noqa: E402

from device_speed import bench_parser, report  # noqa: E402
from random_models import random_model, toy_tokenizer  # noqa: E402


class SavedBytes:
    """Bytes autograd saves, by the part of the model running when they were saved."""

    def __init__(self, model):
        self.params = {p.data_ptr() for p in model.parameters()}
        self.seen, self.part = set(), "loss_head"
        self.bytes = {"encoder": 0, "decoder": 0, "loss_head": 0}
        for name, module in (("encoder", model.encoder), ("decoder", model.gpt.decoder)):
            module.register_forward_pre_hook(lambda m, a, name=name: self._enter(name))
            module.register_forward_hook(lambda m, a, o: self._enter("loss_head"))

    def _enter(self, part):
        self.part = part

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if t.data_ptr() not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.part] += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def measure(preset: str, recompute: str, seconds: float, text_tokens: int, k: int,
            dtype: torch.dtype, tiny: bool) -> dict:
    from ark_mega.kernels import sparse_lm_head, union_kl

    model, prompts = random_model(preset, toy_tokenizer(), dtype, torch.device("cpu"), tiny,
                                  transformer_impl="local", recompute=recompute,
                                  recompute_encoder=recompute == "full")
    cfg = model.cfg
    frames = int(seconds * 100)
    audio = prompts.audio_tokens(frames)
    gen = torch.Generator().manual_seed(0)
    ids = prompts.build(frames).input_ids + torch.randint(
        0, len(prompts.tokenizer.get_vocab()), (text_tokens,), generator=gen).tolist()
    tokens = len(ids)
    feats = [torch.randn(cfg.encoder.num_mel_bins, frames, generator=gen).to(dtype)]
    union = torch.randint(0, cfg.decoder.vocab_size, (text_tokens, 2 * k), generator=gen)
    scores = torch.randn(text_tokens, 2 * k, generator=gen).log_softmax(-1)
    valid = torch.ones(text_tokens, 2 * k, dtype=torch.bool)

    counter = SavedBytes(model)
    with counter.hooks():
        hidden = model(torch.tensor(ids)[None], feats, torch.tensor([0, tokens]),
                       return_hidden=True)  # [T, 1, H]
        logits = sparse_lm_head(hidden[-text_tokens:, 0], model.output_weight(), union)
        union_kl(logits, scores, valid)
    out = {f"{part}_mib_per_token": b / tokens / 2**20 for part, b in counter.bytes.items()}
    out["total_mib_per_token"] = sum(counter.bytes.values()) / tokens / 2**20
    out.update(decoder_tokens=tokens, audio_tokens=audio)
    return out


class Largest:
    """Every op output's storage while active (`with Largest() as made:`), each counted once:
    (op, shape, dtype, bytes) of its first maker; `params`' storages (views of the weights,
    such as a transposed output layer) are not counted."""

    def __init__(self, params=()):
        self.params = {p.untyped_storage().data_ptr() for p in params}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        made, params = {}, self.params
        self.made = made

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor):  # views share their base's storage: once
                        storage = t.untyped_storage()
                        if storage.data_ptr() in params:
                            continue
                        made.setdefault((storage.data_ptr(), storage.nbytes()), (
                            func.overloadpacket.__name__, list(t.shape), str(t.dtype),
                            storage.nbytes()))
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def top(self, n: int, where=lambda shape: True) -> list[dict]:
        made = sorted((m for m in self.made.values() if where(m[1])), key=lambda m: -m[3])
        return [{"op": op, "shape": shape, "dtype": dt, "mib": b / 2**20}
                for op, shape, dt, b in made[:n]]


def transients(preset: str, seconds: float, text_tokens: int, dtype: torch.dtype, tiny: bool,
               top: int = 6, rollouts: int = 2) -> dict:
    """The `top` largest op outputs of one SFT step (forward + backward), and the largest
    vocabulary-wide tensors (logits) of a rollout (prefill and 4 decoding steps) of `rollouts`
    copies of the utterance: prefill's output layer runs at the last position only, so they
    hold `rollouts` rows of V and grow with the batch, not with the prompt."""
    from ark_mega.config import GenerationConfig
    from ark_mega.data import Collator
    from ark_mega.opd.generate import generate
    from ark_mega.opd.steps import sft_step

    model, prompts = random_model(preset, toy_tokenizer(), dtype, torch.device("cpu"), tiny,
                                  transformer_impl="local")
    cfg = model.cfg
    frames = int(seconds * 100)
    gen = torch.Generator().manual_seed(0)
    text = " ".join(["seven"] * text_tokens)
    feats = [torch.randn(cfg.encoder.num_mel_bins, frames, generator=gen).to(dtype)]
    batch = Collator(prompts).batch([prompts.build(frames, text, "en")], feats, ["u"], [text])
    with Largest() as sft:
        sft_step(model, [batch])
    prompt = prompts.build(frames).input_ids
    with Largest(model.parameters()) as rollout, torch.no_grad():
        generate(model, [prompt] * rollouts, feats * rollouts, prompts.stop_id,
                 GenerationConfig(max_new_tokens=4, top_k=8))
    vocab = cfg.decoder.vocab_size
    return {"decoder_tokens": batch.num_tokens, "largest": sft.top(top),
            "rollout": {"utterances": rollouts, "prompt_tokens": len(prompt),
                        "largest_logits": rollout.top(3, lambda s: s[-1:] == [vocab])}}


def budget(config: str, dp: int, gpu_gib: float, seconds: float, text_tokens: int) -> dict:
    """Per-GPU GiB of the OPD step of `config` (see the module docstring)."""
    from ark_mega.config import load_config
    from ark_mega.models import AudioLM, preset
    from ark_mega.models.decode_step import KEPT_CACHE_BYTES, KEPT_STEPS
    from ark_mega.opd.generate import cache_length

    cfg = load_config(config, [])
    counts = {}
    for role in ("student", "teacher"):
        torch.manual_seed(0)
        model = AudioLM(preset(getattr(cfg, role).preset), dtype=torch.bfloat16,
                        transformer_impl="local")
        counts[role] = sum(p.numel() for p in model.parameters())
        if role == "student":
            dec = model.cfg.decoder
        del model
    per_token = measure(cfg.student.preset, cfg.student.recompute, seconds, text_tokens,
                        cfg.opd.top_k, torch.bfloat16, False)
    none = per_token if cfg.student.recompute == "none" else measure(
        cfg.student.preset, "none", seconds, text_tokens, cfg.opd.top_k, torch.bfloat16, False)
    tokens = cfg.data.max_tokens
    utterances = tokens // per_token["decoder_tokens"]
    gib = 2 ** 30
    kv_per_token = dec.num_layers * 2 * dec.num_kv_heads * dec.kv_channels * 2
    cache_len = cache_length(per_token["decoder_tokens"] - text_tokens,
                             cfg.opd.generation.max_new_tokens)
    one_cache = kv_per_token * utterances * cache_len
    parts = {
        "student_weights": 2 * counts["student"] / gib,
        "student_grads": 4 * counts["student"] / gib,
        "optimizer": 12 * counts["student"] / dp / gib,
        "teacher_weights": 2 * counts["teacher"] / gib,
        "activations": per_token["total_mib_per_token"] * tokens / 1024,
        "rollout_kv_cache": (min(KEPT_STEPS * one_cache, max(KEPT_CACHE_BYTES, one_cache))
                             + one_cache) / gib,
        "recomputed_layer": (0.0 if cfg.student.recompute == "none" else
                             none["decoder_mib_per_token"] / dec.num_layers * tokens / 1024),
    }
    total = sum(parts.values())
    return {"config": config, "dp": dp, "recompute": cfg.student.recompute,
            "max_tokens": tokens, "utterances_of_the_batch": utterances,
            "student_params": counts["student"], "teacher_params": counts["teacher"],
            **{f"{k}_gib": v for k, v in parts.items()}, "total_gib": total,
            "gpu_gib": gpu_gib, "headroom": 1 - total / gpu_gib}


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = bench_parser(__doc__, utterance=True, profile=False)  # bytes, not time
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--recompute", nargs="*", default=["none", "selective", "full"])
    ap.add_argument("--transients", action="store_true",
                    help="the largest tensors of one SFT step and of a rollout instead")
    ap.add_argument("--budget", help="a run config: its per-GPU memory budget instead")
    ap.add_argument("--dp", type=int, default=8, help="with --budget: data-parallel ranks")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="with --budget: GPU memory")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.seconds, args.text_tokens, args.k = "tiny_ark_asr", 2.0, 8, 4
    from ark_mega.distributed import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    dtype = torch.float32 if args.smoke else torch.bfloat16
    result = {"date": datetime.date.today().isoformat(),
              "setup": {"preset": args.preset, "seconds": args.seconds,
                        "text_tokens": args.text_tokens, "k": args.k, "dtype": str(dtype)}}
    if args.transients:
        result["transients"] = transients(args.preset, args.seconds, args.text_tokens, dtype,
                                        args.smoke)
        report(result, args.out)
        return 0
    if args.budget:
        result["budget"] = budget(args.budget, args.dp, args.gpu_gib, args.seconds,
                                  args.text_tokens)
        report(result, args.out)
        return 0
    for mode in args.recompute:
        result[mode] = measure(args.preset, mode, args.seconds, args.text_tokens, args.k,
                               dtype, args.smoke)
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
