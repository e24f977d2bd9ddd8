"""Bad input (issue 14 item 5; issue 11's bad-shard line): a config that disagrees with the weights,
NaN/Inf or integer weights, truncated or missing shards, an output location that cannot be written,
a recipe with unknown keys or wrong types, calibration text too short for the recipe. Each is one
line on stderr naming the tensor / key / file, exit code 2 (INTERFACE.md), nothing left at --out,
the source untouched — through `spinfx rewrite|inspect|eval` (run in-process: `spinfx.tools.cli.main`)
and as `spinfx.BadInput` through the Python API."""
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile

import pytest
import torch

import spinfx
from spinfx.testing import zoo
from spinfx.tools.cli import main


def _byte_tokenizer():
    """A byte-level tokenizer with exactly the zoo's 256 ids: one token per byte of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad-input") / "llama"
    zoo.build("llama").model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


def snapshot(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def run(capsys, *args) -> tuple[int, str]:
    """Run the CLI in-process: its exit code and its one error line (progress lines aside)."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[spinfx]")]
    assert len(lines) == 1 and lines[0].startswith("spinfx: "), err[-3000:]
    return rc, lines[0]


def copy(source, work, name="model"):
    dst = work / name
    shutil.copytree(source, dst)
    return dst


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _set(name, value):
    return lambda t: t[name].view(-1).__setitem__(3, value)


def _to_int(name):
    return lambda t: t.__setitem__(name, t[name].to(torch.int32))


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _drop_a_shard(d):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d)
    (d / "model.safetensors").unlink()
    model.save_pretrained(d, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    (d / index["model.layers.1.mlp.up_proj.weight"]).unlink()
    return index["model.layers.1.mlp.up_proj.weight"]


UP = "model.layers.0.mlp.up_proj.weight"
# case -> (how to break a copy of the source, a regex the error line must match)
WEIGHT_CASES = {
    "intermediate_size changed": (lambda d: edit_config(d, intermediate_size=96),
                                  r"model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight.*\[64, 88\].*config\.json"),
    "hidden_size changed": (lambda d: edit_config(d, hidden_size=128), r"model\.embed_tokens\.weight.*\[256, 64\]"),
    "more layers in config": (lambda d: edit_config(d, num_hidden_layers=3), r"model\.layers\.2\..*missing"),
    "fewer layers in config": (lambda d: edit_config(d, num_hidden_layers=1), r"model\.layers\.1\..*not used"),
    "a tensor deleted": (lambda d: edit_tensors(d, lambda t: t.pop(UP)), re.escape(UP) + ".*missing"),
    "NaN weight": (lambda d: edit_tensors(d, _set(UP, float("nan"))), re.escape(UP) + ".*NaN"),
    "Inf weight": (lambda d: edit_tensors(d, _set("model.norm.weight", float("inf"))), r"model\.norm\.weight.*Inf"),
    "integer weight": (lambda d: edit_tensors(d, _to_int(UP)), re.escape(UP) + r".*I32.*float"),
    "truncated shard": (_truncate, r"model\.safetensors.*corrupted"),
    "missing shard": (_drop_a_shard, r"index\.json: missing shard model-\d{5}-of-\d{5}\.safetensors"),
}


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_weights(tmp_path, source, capsys, case):
    breaks, needle = WEIGHT_CASES[case]
    src = copy(source, tmp_path)
    breaks(src)
    before = snapshot(src)
    for command in (["rewrite", src, "--recipe", "fold", "--out", tmp_path / "out"], ["inspect", src],
                    ["eval", src, "--text", src / "config.json", "--ctx", 8]):
        rc, line = run(capsys, *command)
        assert rc == 2 and re.search(needle, line), (command[0], line)
    with pytest.raises(spinfx.BadInput, match=needle):
        spinfx.rewrite(src, "fold")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no --out, no temp dirs
    assert snapshot(src) == before


def test_nonfinite_weight_of_a_module(source):
    model = zoo.build("llama").model
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(spinfx.BadInput, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*NaN"):
        spinfx.rewrite(model, "fold")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_check_of_values_whose_sum_overflows(dtype):
    """check_finite's fast path is a finite sum; finite weights whose sum overflows are still finite, and
    one Inf among them is still found."""
    from spinfx.checkpoint.hf import check_finite

    big = torch.nn.Linear(4, 4, bias=False).to(dtype)
    with torch.no_grad():
        big.weight.fill_(torch.finfo(dtype).max)
    assert not torch.isfinite(big.weight.sum())
    check_finite(big)
    with torch.no_grad():
        big.weight[2, 1] = float("-inf")
    with pytest.raises(spinfx.BadInput, match=r"tensor weight holds Inf \(1 of 16 values\)"):
        check_finite(big)


# ---- output locations ---------------------------------------------------------------------------


def _unwritable(monkeypatch, where):
    """`where` refuses new entries: really (chmod) when not root, else by failing mkdtemp there."""
    if os.geteuid() != 0:
        where.chmod(0o555)
        return
    real = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(where):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


def _full_disk(monkeypatch):
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial file, as a real full disk leaves
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("case, needle", [
    ("under a file", "Not a directory"),
    ("read-only directory", "Permission denied"),
    ("full disk", "No space left on device"),
])
def test_unwritable_output(tmp_path, source, capsys, monkeypatch, case, needle):
    before = snapshot(source)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    if case == "under a file":
        (work / "file").write_text("x")
        out = work / "file" / "out"
    elif case == "read-only directory":
        _unwritable(monkeypatch, work)
    else:
        _full_disk(monkeypatch)
    try:
        rc, line = run(capsys, "rewrite", source, "--recipe", "fold", "--out", out)
        assert rc == 2 and needle in line and str(out) in line, line
        if case == "full disk":  # the Python API: the same error from Result.save
            r = spinfx.rewrite(source, "fold")
            with pytest.raises(spinfx.BadInput, match=needle):
                r.save(out)
        assert sorted(p.name for p in work.iterdir()) == (["file"] if case == "under a file" else [])
    finally:
        work.chmod(0o755)
    assert snapshot(source) == before


def test_safetensors_io_errors_are_os_errors(tmp_path):
    """safetensors reports a failed write as its own error type; spinfx raises it as the OSError it is
    (what staged_dir turns into the one line naming --out)."""
    from spinfx.checkpoint.write import save_tensors

    with pytest.raises(FileNotFoundError):
        save_tensors({"w": torch.zeros(4)}, tmp_path / "no-such-dir" / "model.safetensors")


def test_missing_parents_are_not_left_behind(tmp_path, source, capsys, monkeypatch):
    _full_disk(monkeypatch)
    rc, line = run(capsys, "rewrite", source, "--recipe", "fold", "--out", tmp_path / "a" / "b" / "out")
    assert rc == 2 and "No space left" in line
    assert not (tmp_path / "a").exists()


# ---- recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("passes, needle", [
    ("- rotate: {r1: 3}", r"rotate.*r1.*3"),
    ("- rotate: {r1: householder}", r"rotate.*r1.*householder"),
    ("- rotate: {r3: 'yes'}", r"rotate.*r3"),
    ("- rotate: {seed: 1.5}", r"rotate.*seed"),
    ("- rotate: [hadamard]", r"rotate.*mapping"),
    ("- rotate: {r5: true}", r"rotate.*no option.*r5"),
    ("- fold-norms: {tie: 3}", r"fold-norms.*tie"),
    ("- no-such-pass: {}", r"unknown pass 'no-such-pass'"),
    ("- quantize: {weights: {bits: four}}", r"quantize.*bits.*four"),
    ("- quantize: {weights: {bits: 4, group_size: '128'}}", r"quantize.*group_size"),
    ("- quantize: {weights: {bits: 4, symmetric: 1}}", r"quantize.*symmetric"),
    ("- quantize: {weights: {bits: 4, nbits: 4}}", r"quantize.*no option.*nbits"),
    ("- quantize: {weights: 4}", r"quantize.*weights"),
    ("- quantize: {ignore: lm_head}", r"quantize.*ignore"),
    ("- quantize: {weights: {bits: 4}, samples: -1}", r"quantize.*samples"),
    ("- quantize: {activations: {bits: 4, per: token}}", r"quantize.*activations.*per"),
    ("- quantize: {activations: {bits: 4, clip_ratio: 1.5}}", r"quantize: activations clip_ratio.*\(0, 1\], got 1.5"),
])
def test_bad_recipe_is_bad_input(tmp_path, source, capsys, passes, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"passes:\n  {passes}\n")
    rc, line = run(capsys, "rewrite", source, "--recipe", recipe, "--out", tmp_path / "out")
    assert rc == 2 and re.search(needle, line), line
    with pytest.raises(spinfx.BadInput, match=needle):
        spinfx.recipe.load_recipe(recipe)
    assert not (tmp_path / "out").exists()


def test_pass_options_are_checked_when_built_in_python():
    from spinfx.passes import Quantize, Rotate

    with pytest.raises(spinfx.BadInput, match="r1"):
        Rotate(r1=3)
    with pytest.raises(spinfx.BadInput, match="bits"):
        Quantize(weights={"bits": "four"})


# ---- calibration text ---------------------------------------------------------------------------

GPTQ = "passes:\n  - quantize: {weights: {bits: 4, group_size: 32, method: gptq}, samples: 4}\n"


def test_calibration_file_too_short(tmp_path, source, capsys):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(GPTQ)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be: that is the question.\n" * 20)  # 860 bytes = 860 tokens here
    rc, line = run(capsys, "rewrite", source, "--recipe", recipe, "--calib", tiny, "--out", tmp_path / "out")
    assert rc == 2, line
    assert "4 windows of 512 tokens (2048 tokens)" in line and "860 tokens (1 window)" in line and "tiny.txt" in line, line
    assert not (tmp_path / "out").exists()


def test_calibration_tokens_too_few_python_api(tmp_path):
    from spinfx.passes import Quantize
    from spinfx.recipe import Recipe

    zm = zoo.build("llama")  # traced for [1, 8]: 3 windows of 8 tokens where the recipe asks 4
    rec = Recipe("gptq", [Quantize(weights={"bits": 4, "group_size": 32, "method": "gptq"}, samples=4)])
    with pytest.raises(spinfx.BadInput, match=r"4 windows of 8 tokens \(32 tokens\).* 24 tokens"):
        spinfx.rewrite(zm.model, rec, zm.example_inputs, calib=torch.arange(24))
    with pytest.raises(spinfx.BadInput, match=r"4 windows of 512 tokens \(2048 tokens\).* 600 tokens"):
        spinfx.rewrite(zm.model, rec, calib=torch.arange(600) % 256)


@pytest.fixture(scope="module")
def w4_checkpoint(source, tmp_path_factory):
    return spinfx.rewrite(source, "w4a16").save(tmp_path_factory.mktemp("w4") / "w4")


@pytest.mark.parametrize("case, needle", [
    ("hidden_size changed", r"model\.layers\.0\.input_layernorm\.weight is \[64\].*\[128\]"),
    ("NaN norm", r"model\.norm\.weight holds NaN"),
])
def test_bad_spinfx_checkpoint(tmp_path, w4_checkpoint, capsys, case, needle):
    """A quantized spinfx checkpoint (read by spinfx.load, not transformers) is checked the same way."""
    ckpt = copy(w4_checkpoint, tmp_path)
    if case == "hidden_size changed":
        edit_config(ckpt, hidden_size=128)
    else:
        edit_tensors(ckpt, _set("model.norm.weight", float("nan")))
    rc, line = run(capsys, "eval", ckpt, "--text", ckpt / "config.json", "--ctx", 8)
    assert rc == 2 and re.search(needle, line), line
    with pytest.raises(spinfx.BadInput, match=needle):
        spinfx.load(ckpt)
