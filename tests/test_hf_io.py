"""Hugging Face folders in and out (tools/convert_checkpoint.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ark_mega.data import train_bpe_tokenizer
from ark_mega.models import preset
from conftest import load_tool, torchrun
from hf_reference import build_hf_model, hf_logits, make_utterances

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TOOL = load_tool("convert_checkpoint")


def ok(*args):
    """The tool's main() in this process (as a subprocess it would pay the imports each time)."""
    argv = sys.argv
    sys.argv = ["convert_checkpoint.py", *map(str, args)]
    try:
        assert TOOL.main() == 0
    finally:
        sys.argv = argv


def test_command_line(glmasr_folder):
    d, _ = glmasr_folder
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "import", d / "hf",
                           d / "ck_cli"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (d / "ck_cli" / "step_000000" / "model.json").is_file()
    assert (d / "ck_cli" / "tokenizer" / "tokenizer.json").is_file()


def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    def convert(*env):
        return subprocess.run([sys.executable, "tools/convert_checkpoint.py", "import",
                               tmp_path / "nowhere", tmp_path / "out"], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, **dict(env)})

    proc = convert()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: {tmp_path / 'nowhere' / 'config.json'}: No such file" in proc.stderr
    assert "Traceback" in convert(("ARK_DEBUG", "1")).stderr


@pytest.fixture(scope="module")
def glmasr_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("glmasr")
    model = build_hf_model(preset("tiny_ark_asr"))
    model.save_pretrained(d / "hf")
    train_bpe_tokenizer(["hello there", "你好世界"], 300).save(str(d / "hf" / "tokenizer.json"))
    return d, model


def same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_glmasr_round_trip_through_a_parallel_checkpoint(single_rank, glmasr_folder, tp, pp):
    from transformers import GlmAsrForConditionalGeneration

    d, original = glmasr_folder
    ok("import", d / "hf", d / f"ck{tp}{pp}")
    torchrun("dist_reshard.py", str(d / f"ck{tp}{pp}"), str(d / f"re{tp}{pp}"), "--tp", str(tp),
             "--pp", str(pp))
    ok("export", d / f"re{tp}{pp}", d / f"out{tp}{pp}", "--layout", "glmasr", "--tokenizer", d / "hf")
    back = GlmAsrForConditionalGeneration.from_pretrained(str(d / f"out{tp}{pp}")).eval()
    same_state(original.state_dict(), back.state_dict())
    gen = json.loads((d / f"out{tp}{pp}" / "generation_config.json").read_text())
    assert gen["eos_token_id"] not in gen["suppress_tokens"] and gen["suppress_tokens"]
    assert (d / f"out{tp}{pp}" / "tokenizer.json").is_file()


def test_exported_model_gives_our_logits(single_rank, glmasr_folder):
    from transformers import GlmAsrForConditionalGeneration

    from ark_mega import checkpoint
    from ark_mega.models import AudioLM

    d, _ = glmasr_folder
    ok("import", d / "hf", d / "ck_logits")
    ok("export", d / "ck_logits", d / "out_logits", "--layout", "glmasr", "--tokenizer", d / "hf")
    cfg = checkpoint.model_config(str(d / "ck_logits"))
    ours = AudioLM(cfg)
    checkpoint.load(str(d / "ck_logits"), ours)
    theirs = GlmAsrForConditionalGeneration.from_pretrained(str(d / "out_logits")).eval()
    utts = make_utterances(cfg, [64, 64], [5, 9], seed=4)
    ref = hf_logits(theirs, cfg, utts, batched=True)
    ids = torch.zeros(2, max(u[1].numel() for u in utts), dtype=torch.long)
    for i, (_, t) in enumerate(utts):
        ids[i, : t.numel()] = t
    with torch.no_grad():
        got = ours.eval()(ids, [f for f, _ in utts])
    for i, r in enumerate(ref):
        assert (got[: r.shape[0], i] - r).abs().max() <= 1e-4 * r.abs().max()


def test_arkasr_layout_round_trip(single_rank, glmasr_folder):
    d, original = glmasr_folder
    ok("import", d / "hf", d / "ck_ark")
    ok("export", d / "ck_ark", d / "ark", "--layout", "arkasr", "--tokenizer", d / "hf")
    cfg = json.loads((d / "ark" / "config.json").read_text())
    assert cfg["model_type"] == "arkasr" and cfg["whisper_config"]["d_model"] == 32
    names = load_file(str(d / "ark" / "model.safetensors"))
    assert "audio_encoder.adapting.0.weight" in names and "model.embed_tokens.weight" in names
    assert "audio_encoder.whisper.layers.0.self_attn.k_proj.bias" not in names  # no key bias
    ok("import", d / "ark", d / "ck_ark2")
    ok("export", d / "ck_ark2", d / "back", "--layout", "glmasr", "--tokenizer", d / "hf")
    same_state(load_file(str(d / "hf" / "model.safetensors")),
               load_file(str(d / "back" / "model.safetensors")))


def test_qwen3_asr_native_and_thinker_names_import(tmp_path, single_rank):
    from ark_mega import checkpoint
    from ark_mega.models import AudioLM

    model = build_hf_model(preset("tiny_qwen3_asr"))
    model.save_pretrained(tmp_path / "native")
    ok("import", tmp_path / "native", tmp_path / "ck")
    # the original qwen-asr layout: thinker.* names, proj1/proj2 inside the audio tower
    (tmp_path / "thinker").mkdir()
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    (tmp_path / "thinker" / "config.json").write_text(json.dumps({"thinker_config": config}))
    renamed = {}
    for k, v in load_file(str(tmp_path / "native" / "model.safetensors")).items():
        k = k.replace("model.multi_modal_projector.linear_1", "thinker.audio_tower.proj1")
        k = k.replace("model.multi_modal_projector.linear_2", "thinker.audio_tower.proj2")
        k = k.replace("model.audio_tower.", "thinker.audio_tower.").replace(
            "model.language_model.", "thinker.model.")
        renamed[k] = v
    save_file(renamed, str(tmp_path / "thinker" / "model.safetensors"))
    ok("import", tmp_path / "thinker", tmp_path / "ck_thinker")
    a, b = AudioLM(checkpoint.model_config(str(tmp_path / "ck"))), None
    checkpoint.load(str(tmp_path / "ck"), a)
    b = AudioLM(checkpoint.model_config(str(tmp_path / "ck_thinker")))
    checkpoint.load(str(tmp_path / "ck_thinker"), b)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k


def test_clear_errors(single_rank, glmasr_folder, tmp_path):
    from ark_mega.convert.hf_folder import UnsupportedConfig

    d, _ = glmasr_folder
    tensors = load_file(str(d / "hf" / "model.safetensors"))
    config = json.loads((d / "hf" / "config.json").read_text())

    def folder(name, tensors, config):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    missing = {k: v for k, v in tensors.items() if k != "audio_tower.layers.1.mlp.fc2.weight"}
    with pytest.raises(KeyError, match="'model.audio_tower.layers.1.mlp.fc2.weight' is missing"):
        ok("import", folder("missing", missing, config), tmp_path / "x1")
    with pytest.raises(KeyError, match="unexpected tensor\\(s\\), first 'extra.weight'"):
        ok("import", folder("extra", {**tensors, "extra.weight": torch.zeros(2)}, config), tmp_path / "x2")
    bad = dict(tensors)
    bad["multi_modal_projector.linear_2.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="encoder.adapter.fc2.bias has shape \\(7,\\)"):
        ok("import", folder("shape", bad, config), tmp_path / "x3")
    llama = json.loads(json.dumps(config))
    llama["text_config"]["model_type"] = "llama"
    with pytest.raises(UnsupportedConfig, match="only Qwen2 \\(QKV bias\\) text models"):
        ok("import", folder("llama", tensors, llama), tmp_path / "x4")
    nan = dict(tensors)
    nan["audio_tower.conv1.weight"] = nan["audio_tower.conv1.weight"].clone()
    nan["audio_tower.conv1.weight"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="tensor 'audio_tower.conv1.weight' has non-finite values"):
        ok("import", folder("nan", nan, config), tmp_path / "x5")
    cut = folder("truncated", tensors, config)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated/model.safetensors"):
        ok("import", cut, tmp_path / "x6")


def test_conversions_never_write_over_an_earlier_one_unless_asked(single_rank, glmasr_folder):
    d, _ = glmasr_folder
    ok("import", d / "hf", d / "ow_ck")
    with pytest.raises(FileExistsError, match="already holds a checkpoint .*--overwrite"):
        ok("import", d / "hf", d / "ow_ck")
    ok("import", d / "hf", d / "ow_ck", "--overwrite")
    # an earlier export in shards: a new single-file export with --overwrite leaves no stale shard
    ok("export", d / "ow_ck", d / "ow_hf", "--layout", "glmasr", "--tokenizer", d / "hf",
       "--max-shard-gb", "0.0001")
    assert (d / "ow_hf" / "model.safetensors.index.json").is_file()
    (d / "ow_hf" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds an export"):
        ok("export", d / "ow_ck", d / "ow_hf", "--layout", "glmasr", "--tokenizer", d / "hf")
    ok("export", d / "ow_ck", d / "ow_hf", "--layout", "glmasr", "--tokenizer", d / "hf", "--overwrite")
    left = sorted(os.listdir(d / "ow_hf"))
    assert not [n for n in left if n.startswith("model-") or n.endswith(".index.json")], left
    assert "model.safetensors" in left and "notes.txt" in left  # not ours: kept


def test_qwen3_asr_export_loads_in_transformers_with_our_logits(tmp_path, single_rank):
    from transformers import Qwen3ASRForConditionalGeneration

    from ark_mega import checkpoint
    from ark_mega.models import AudioLM

    build_hf_model(preset("tiny_qwen3_asr")).save_pretrained(tmp_path / "native")
    train_bpe_tokenizer(["hello there", "你好世界"], 300).save(str(tmp_path / "tokenizer.json"))
    ok("import", tmp_path / "native", tmp_path / "ck")
    ok("export", tmp_path / "ck", tmp_path / "out", "--tokenizer", tmp_path)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen3_asr"
    same_state(load_file(str(tmp_path / "native" / "model.safetensors")),
               load_file(str(tmp_path / "out" / "model.safetensors")))
    cfg = checkpoint.model_config(str(tmp_path / "ck"))
    ours = AudioLM(cfg)
    checkpoint.load(str(tmp_path / "ck"), ours)
    theirs = Qwen3ASRForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    utts = make_utterances(cfg, [200], [6], seed=5)
    ref = hf_logits(theirs, cfg, utts, batched=False)
    with torch.no_grad():
        got = ours.eval()(utts[0][1][None], [utts[0][0]])
    assert (got[:, 0] - ref[0]).abs().max() <= 1e-4 * ref[0].abs().max()
    with pytest.raises(ValueError, match="export it with --layout qwen3_asr, not glmasr"):
        ok("export", tmp_path / "ck", tmp_path / "bad", "--layout", "glmasr", "--tokenizer", tmp_path)
