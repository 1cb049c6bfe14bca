"""Every user mistake: one clear sentence on stderr, exit status 2, nothing written, the source untouched."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pipeline import tree_digest
from tiny_models import save_tiny_model

import quant
from cli.main import main
from quant.config import AWQOptions
from quant.errors import QtoolError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, capsys):
    code, err, _ = run_cli_out(args, capsys)
    return code, err


def run_cli_out(args, capsys):
    old = sys.argv
    sys.argv = ["qtool", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def assert_refused(code, err, *fragments):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def model(tmp_path):
    return save_tiny_model("llama", tmp_path / "src")


def _no_output(tmp_path):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out") or p.name == "out"]
    assert not leftovers, leftovers


def test_missing_folder(tmp_path, capsys):
    code, err = run_cli(["rtn", tmp_path / "nope", "-o", tmp_path / "out"], capsys)
    assert_refused(code, err, "nope", "no such folder")
    _no_output(tmp_path)


@pytest.mark.parametrize("command", [["rtn"], ["awq"], ["ppl"], ["info"]])
def test_a_blank_model_folder_is_refused_not_read_as_the_working_folder(tmp_path, capsys, monkeypatch, command):
    save_tiny_model("llama", tmp_path)  # the working folder is a model: "" must not quantize or score it
    monkeypatch.chdir(tmp_path)
    out = ["-o", tmp_path / "out"] if command[0] in ("rtn", "awq") else []
    assert_refused(*run_cli([*command, "", *out], capsys), "the model folder is blank")
    _no_output(tmp_path)


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["rtn", tmp_path / "empty", "-o", tmp_path / "out"], capsys)
    assert_refused(code, err, "has no config.json")


@pytest.mark.parametrize("command", [["rtn"], ["ppl"], ["info"], ["kv", "calibrate"]])
@pytest.mark.parametrize("content,said", [
    (b"[1, 2]", "config.json: holds a JSON array, not an object of settings"),
    (b"null", "config.json: holds a JSON null, not an object of settings"),  # was "a JSON NoneType"
    (b"\xff\xfe{", "config.json: is not UTF-8 text (byte 0xff at offset 0), so not JSON")])  # was a traceback
def test_a_config_that_is_no_json_object_is_refused(model, tmp_path, capsys, command, content, said):
    (model / "config.json").write_bytes(content)
    out = ["-o", tmp_path / "out"] if command == ["rtn"] else []
    code, err = run_cli([*command, model, *out], capsys)
    assert_refused(code, err, said)


def test_a_legacy_quantize_config_that_is_no_json_is_one_sentence(model, tmp_path, capsys):
    """AutoGPTQ's quantize_config.json beside config.json is read for what config.json leaves out: a damaged one
    ended ppl and info in a JSONDecodeError traceback."""
    out = _edited_checkpoint(model, tmp_path / "q", capsys)
    (out / "quantize_config.json").write_text('{"bits": 4,')
    for command in (["info", out], ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(command, capsys), "quantize_config.json: is not valid JSON")


def test_not_a_causal_lm(tmp_path, capsys):
    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    code, err = run_cli(["rtn", d, "-o", tmp_path / "out"], capsys)
    assert_refused(code, err, "'t5'", "not a causal language model")


def test_a_checkpoint_of_an_unknown_model_type_is_one_sentence_in_info_too(model, tmp_path, capsys):
    """info printed transformers' three paragraphs (with pip install advice) where ppl said it in one sentence."""
    out = _edited_checkpoint(model, tmp_path / "q", capsys, None, lambda c: c.update({"model_type": "bogus"}))
    for args in (["info", out], ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]):
        code, err = run_cli(args, capsys)
        assert_refused(code, err, "model_type 'bogus' is not a causal language model")
        assert "pip install" not in err


@pytest.mark.parametrize("kind, said", [("fifo", "is not a regular file (a FIFO, socket or device)"),
                                        ("folder", "is a folder"), ("dangling", "is a link to nothing")])
def test_a_weight_file_that_is_no_regular_file_is_one_sentence(model, tmp_path, capsys, kind, said):
    """A FIFO named model.safetensors made info (and every reader of the folder) wait forever on its first read."""
    out = _edited_checkpoint(model, tmp_path / "q", capsys)
    for folder in (out, model):
        f = folder / "model.safetensors"
        f.unlink()
        if kind == "fifo":
            os.mkfifo(f)
        elif kind == "folder":
            f.mkdir()
        else:
            f.symlink_to(tmp_path / "gone.safetensors")
    for args in (["info", out], ["ppl", out, "--max-tokens", "64", "--seqlen", "32"],
                 ["rtn", model, "-o", tmp_path / "out", "--group-size", "32"]):
        assert_refused(*run_cli(args, capsys), f"model.safetensors: {said}; a weight file must be a regular file")


def test_unsupported_model_type(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(d)
    code, err = run_cli(["rtn", d, "-o", tmp_path / "out"], capsys)
    assert_refused(code, err, "'gpt2' is not supported", "llama", "qwen2")
    _no_output(tmp_path)


def test_bits_5_with_the_awq_format(model, tmp_path, capsys):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--bits", "5", "--format", "awq"], capsys)
    assert_refused(code, err, "--format awq", "AWQ gemm layout holds 4-bit weights, not 5-bit")


@pytest.mark.parametrize("bits", ["5", "1", "16"])
def test_bits_no_format_can_hold(model, tmp_path, capsys, bits):
    for method in ("rtn", "awq", "gptq"):
        code, err = run_cli([method, model, "-o", tmp_path / "out", "--bits", bits], capsys)
        assert_refused(code, err, f"--bits {bits} is not supported; use 2, 3, 4 or 8")


def test_bits_are_checked_before_torch_is_imported_and_are_what_the_layouts_hold():
    """--bits 5 was answered after the layouts' checks had imported torch (4 s instead of 0.4)."""
    code = ("import sys\nfrom quant.config import QuantConfig\nfrom quant.errors import QtoolError\n"
            "try:\n    QuantConfig(bits=5)\nexcept QtoolError:\n    print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "False"
    from quant.config import BITS
    from quant.formats import format_names, get_format
    assert set(BITS) == {b for name in format_names() for b in get_format(name).bits}


def test_group_size_not_offered(model, tmp_path, capsys):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "100"], capsys)
    assert_refused(code, err, "--group-size 100", "-1")


def test_n_samples_beyond_what_memory_can_hold_is_refused_before_tokenizing(model, tmp_path, capsys):
    """10^8 windows of 32 tokens asked the tokenizing child for a 25.6 GB tensor: a traceback."""
    code, err = run_cli(["gptq", model, "-o", tmp_path / "out", "--n-samples", "100000000", "--seqlen", "32"], capsys)
    assert_refused(code, err, "--n-samples 100000000", "1 to 4096")
    _no_output(tmp_path)


@pytest.mark.parametrize("value", ["-1", "257"])
def test_check_windows_out_of_range(model, tmp_path, capsys, value):
    code, err = run_cli(["gptq", model, "-o", tmp_path / "out", "--check-windows", value], capsys)
    assert_refused(code, err, f"--check-windows {value}", "0 (the guard windows only) to 256")
    _no_output(tmp_path)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_check_windows_with_the_checks_turned_off_is_refused(model, tmp_path, capsys, method):
    """--held-out 0 turns off the whole-model check; an explicit --check-windows asked for it."""
    code, err = run_cli([method, model, "-o", tmp_path / "out", "--held-out", "0", "--check-windows", "4"], capsys)
    assert_refused(code, err, "--check-windows 4", "--held-out 0")
    code, err = run_cli([method, model, "-o", tmp_path / "out", "--held-out", "0", "--check-windows", "999"], capsys)
    assert_refused(code, err, "--check-windows 999 is out of range")  # the range first
    if method == "awq":  # a replay runs no check either
        assert run_cli(["awq", model, "-o", tmp_path / "a", "--group-size", "32", "--n-samples", "4", "--seqlen", "32",
                        "--held-out", "0"], capsys)[0] == 0
        code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--group-size", "32", "--apply-search", tmp_path / "a",
                             "--check-windows", "2"], capsys)
        assert_refused(code, err, "--check-windows 2", "--apply-search")
    _no_output(tmp_path)


def test_search_options_given_to_a_replay_are_refused(model, tmp_path, capsys):
    """A replay reads the saved scales and clips: --no-clip was ignored (and recorded as clip: false in qtool.json
    although the output was clipped), a calibration file that does not exist was accepted."""
    assert run_cli(["awq", model, "-o", tmp_path / "a", "--group-size", "32", "--n-samples", "4", "--seqlen", "32",
                    "--held-out", "0"], capsys)[0] == 0
    replay = ["awq", model, "-o", tmp_path / "out", "--group-size", "32", "--apply-search", tmp_path / "a"]
    code, err = run_cli([*replay, "--no-clip"], capsys)
    assert_refused(code, err, "--no-clip:", "--apply-search", "would not be used")
    code, err = run_cli([*replay, "--calib-data", tmp_path / "nonexistent.txt", "--n-samples", "8", "--quantized-inputs"],
                        capsys)
    assert_refused(code, err, f"--calib-data {tmp_path / 'nonexistent.txt'}, --n-samples 8, --quantized-inputs:")
    _no_output(tmp_path)
    code, err = run_cli([*replay, "--bits", "4", "--sym"], capsys)  # what the replay uses may be given; --sym is checked
    assert_refused(code, err, "made for", "symmetric")
    assert "would not be used" not in err
    assert run_cli(replay, capsys)[0] == 0


def test_a_replay_that_does_not_fit_names_the_file_and_the_block(model, tmp_path, capsys):
    """A scaled group the run keeps in full precision (--skip), an entry of the wrong shape: the sentence said
    "search results entry 'mlp.up_proj.awq_scale'", naming neither the file nor the block nor the --skip."""
    assert run_cli(["awq", model, "-o", tmp_path / "a", "--group-size", "32", "--n-samples", "4", "--seqlen", "32",
                    "--held-out", "0"], capsys)[0] == 0
    search = tmp_path / "a" / "qtool" / "awq_search.safetensors"
    scaled = sorted({k.rsplit(".", 2)[0] for k in load_file(str(search)) if k.endswith("awq_scale")
                     and k.startswith("model.layers.1.mlp.")})
    assert scaled, "the tiny model's search scaled no MLP linear of block 1"
    code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--group-size", "32", "--apply-search", tmp_path / "a",
                         "--skip", "model.layers.1.mlp"], capsys)
    assert_refused(code, err, f"{search}, block 1: the search scales", "(--skip)")
    entries = load_file(str(search))
    key = next(k for k in entries if k.startswith("model.layers.1.") and k.endswith("awq_clip"))
    entries[key] = entries[key][:, :1].contiguous()
    older = tmp_path / "older.safetensors"  # no header: shapes are all that can be checked
    save_file(entries, str(older))
    code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--group-size", "32", "--apply-search", older], capsys)
    assert_refused(code, err, f"{older}, block 1: entry {key[len('model.layers.1.'):]!r} has shape")
    for outside in ("model.layers.5.self_attn.q_proj.awq_scale", "lm_head.awq_scale"):  # a 2-block model
        extra = tmp_path / "extra.safetensors"
        save_file({**load_file(str(search)), outside: torch.ones(64)}, str(extra))
        code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--group-size", "32", "--apply-search", extra],
                            capsys)
        assert_refused(code, err, f"{extra}: entry {outside!r} belongs to none of this model's 2 blocks")
    code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--group-size", "32", "--apply-search",
                         tmp_path / "nonexistent"], capsys)  # one sentence, not click's usage block
    assert_refused(code, err, f"{tmp_path / 'nonexistent'}: no such search results file")
    _no_output(tmp_path)


def test_group_size_that_divides_no_layer(model, tmp_path, capsys):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "256"], capsys)
    assert_refused(code, err, "no linear layer can be quantized", "not divisible by group size 256")
    _no_output(tmp_path)


@pytest.mark.parametrize("content", ["", "a few words only"])
def test_empty_or_too_short_calibration_file(model, tmp_path, capsys, content):
    f = tmp_path / "calib.txt"
    f.write_text(content)
    before = tree_digest(model)
    code, err = run_cli(["gptq", model, "-o", tmp_path / "out", "--calib-data", f, "--seqlen", "64"], capsys)
    assert_refused(code, err, "calib.txt")
    _no_output(tmp_path)
    assert tree_digest(model) == before


@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl"])
def test_a_calibration_file_that_is_not_utf8_text_is_refused(model, tmp_path, capsys, name):
    f = tmp_path / name
    f.write_bytes(b'{"text": "plain words \xfe\xff\x00 then bytes"}\n')
    code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--calib-data", f, "--group-size", "32"], capsys)
    assert_refused(code, err, name, "not UTF-8", "0xfe")
    _no_output(tmp_path)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta", ""])
def test_a_device_qtool_does_not_run_on_is_refused(model, tmp_path, capsys, device):
    code, err = run_cli(["gptq", model, "-o", tmp_path / "out", "--group-size", "32", "--device", device], capsys)
    assert_refused(code, err, f"--device {device!r}", "auto, cpu, cuda or cuda:N")
    _no_output(tmp_path)
    code, err = run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32", "--device", device], capsys)
    assert_refused(code, err, f"--device {device!r}")


def test_a_damaged_parquet_calibration_file_is_refused(model, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    f = tmp_path / "calib.parquet"
    f.write_bytes(b"PAR1 not really a parquet file")
    code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--calib-data", f, "--group-size", "32"], capsys)
    assert_refused(code, err, "calib.parquet", "cannot be read")


def test_output_and_seqlen_are_refused_before_the_calibration_text_is_read(tmp_path, capsys, monkeypatch):
    from calib import data

    def read(*args, **kwargs):
        raise AssertionError("the calibration text was read")

    monkeypatch.setattr(data, "load_texts", read)  # a forked child inherits it
    src = save_tiny_model("opt", tmp_path / "src")  # learned positions: seqlen is bounded
    (tmp_path / "out").mkdir()
    code, err = run_cli(["awq", src, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, "already exists")
    limit = json.loads((src / "config.json").read_text())["max_position_embeddings"]
    code, err = run_cli(["awq", src, "-o", tmp_path / "o2", "--group-size", "32", "--seqlen", limit + 1], capsys)
    assert_refused(code, err, f"--seqlen {limit + 1}", "learned position embeddings")


def test_an_embedding_of_another_vocabulary_is_refused_before_any_block(model, tmp_path, capsys, monkeypatch):
    """RTN reads the embeddings only to write them, but checks their shape when it starts (it used to quantize
    every block first)."""
    from quant.source import SourceModel

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 10}))
    loaded, real = [], SourceModel.load_block
    monkeypatch.setattr(SourceModel, "load_block", lambda self, i: loaded.append(i) or real(self, i))
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, "has shape (320, 64)", "gives this model (330, 64)")
    assert loaded == []
    _no_output(tmp_path)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(model, tmp_path, capsys, bad, name):
    f = model / "model.safetensors"
    tensors = load_file(str(f))
    tensors[name][-3, 5] = bad  # the embedding's last rows: its last slice read
    save_file(tensors, str(f), metadata={"format": "pt"})
    before = tree_digest(model)
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, name, "NaN or inf")
    _no_output(tmp_path)
    assert tree_digest(model) == before


def test_output_exists(model, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_an_output_that_is_a_file_is_not_offered_overwrite(model, tmp_path, capsys):
    """-o naming a file said "pass --overwrite to replace it", and --overwrite then refused a file."""
    (tmp_path / "out").write_text("mine")
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, "already exists; choose another -o (it is a file, which --overwrite does not replace)")
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a /proc file system")
def test_an_output_where_no_folder_can_be_made_is_one_sentence(model, capsys):
    """/proc passes os.access(W_OK) for root but refuses mkdir: the temporary folder's OSError was a traceback."""
    if not os.access("/proc", os.W_OK):
        pytest.skip("/proc is not writable-looking here: the check before mkdtemp refuses it already")
    code, err = run_cli(["rtn", model, "-o", "/proc/qtool-out", "--group-size", "32"], capsys)
    assert_refused(code, err, "/proc: a folder cannot be created there", "choose another -o")


def test_overwrite_never_replaces_a_folder_that_is_not_a_checkpoint(model, tmp_path, capsys, monkeypatch):
    """--overwrite replaces an earlier checkpoint or an empty folder; an empty -o (an unset shell variable),
    a folder of other files and the working folder are refused and left exactly as they were."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, err = run_cli(["rtn", model, "-o", other, "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, "holds files that are not a checkpoint (keep.txt)", "choose another -o")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    code, err = run_cli(["rtn", model, "-o", other.parent / "src_copy", "--group-size", "32"], capsys)
    assert code == 0, err
    (other.parent / "src_copy" / "config.json").write_text((model / "config.json").read_text())  # full precision
    code, err = run_cli(["rtn", model, "-o", other.parent / "src_copy", "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, "holds a full-precision model")
    monkeypatch.chdir(other)
    code, err = run_cli(["rtn", model, "-o", "", "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, "-o is blank")
    ckpt = tmp_path / "ckpt"
    assert run_cli(["rtn", model, "-o", ckpt, "--group-size", "32"], capsys)[0] == 0
    monkeypatch.chdir(ckpt / "qtool") if (ckpt / "qtool").is_dir() else monkeypatch.chdir(ckpt)
    before = sorted(p.name for p in ckpt.iterdir())
    code, err = run_cli(["rtn", model, "-o", ckpt, "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, "is the working folder or holds it")
    assert sorted(p.name for p in ckpt.iterdir()) == before and (other / "keep.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (ckpt, empty):  # an earlier checkpoint and an empty folder are replaced
        assert run_cli(["rtn", model, "-o", target, "--overwrite", "--group-size", "64"], capsys)[0] == 0
        assert (target / "model.safetensors").is_file()
    before = sorted(p.name for p in ckpt.iterdir())  # "ckpt/qtool/..": the checkpoint itself, nothing left inside it
    assert run_cli(["rtn", model, "-o", f"{ckpt}/qtool/..", "--overwrite", "--group-size", "32"], capsys)[0] == 0
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_overwrite_never_deletes_a_folder_put_inside_the_checkpoint(model, tmp_path, capsys):
    """A checkpoint holding another checkpoint (or the user's results) in a subfolder: --overwrite deleted it."""
    ckpt = tmp_path / "ckpt"
    assert run_cli(["rtn", model, "-o", ckpt, "--group-size", "32"], capsys)[0] == 0
    assert run_cli(["rtn", model, "-o", ckpt / "w4g64", "--group-size", "64"], capsys)[0] == 0
    (ckpt / "eval").mkdir()
    (ckpt / "eval" / "ppl.txt").write_text("mine")
    before = tree_digest(ckpt)
    code, err = run_cli(["rtn", model, "-o", ckpt, "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, f"{ckpt}: holds the folder eval/", "--overwrite would delete it")
    assert tree_digest(ckpt) == before
    (ckpt / "eval" / "ppl.txt").unlink()
    (ckpt / "eval").rmdir()
    code, err = run_cli(["rtn", model, "-o", ckpt, "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, "holds the folder w4g64/")
    assert (ckpt / "w4g64" / "model.safetensors").is_file()
    shutil.rmtree(ckpt / "w4g64")
    for inside in ("qtool/runs/notes.txt", "qtool/notes.txt", ".cache/precious/config.json"):  # qtool's, a download's
        (ckpt / inside).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / inside).write_text("mine")
        before = tree_digest(ckpt)
        code, err = run_cli(["rtn", model, "-o", ckpt, "--overwrite", "--group-size", "32"], capsys)
        assert_refused(code, err, f"holds {'/'.join(inside.split('/')[:2])}, which is not part of a checkpoint")
        assert tree_digest(ckpt) == before
        shutil.rmtree(ckpt / inside.split("/")[0]) if inside.startswith(".") else (ckpt / inside).unlink()
        if inside == "qtool/runs/notes.txt":
            (ckpt / "qtool" / "runs").rmdir()
    (ckpt / ".cache" / "huggingface").mkdir(parents=True)  # what huggingface-cli download --local-dir leaves
    assert run_cli(["rtn", model, "-o", ckpt, "--overwrite", "--group-size", "64"], capsys)[0] == 0  # qtool/ is its own


def test_an_output_inside_a_file_is_named_as_such(model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(["rtn", model, "-o", tmp_path / "afile" / "x", "--group-size", "32"], capsys)
    assert_refused(code, err, "afile: is a file, so the output folder cannot be made in it")


def test_output_is_the_source(model, capsys):
    before = tree_digest(model)
    code, err = run_cli(["rtn", model, "-o", model, "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, "is the source model")
    assert tree_digest(model) == before


@pytest.mark.parametrize("where", ["parent", "inside", "symlink_to_source", "inside_via_symlink"])
def test_output_overlapping_the_source_is_refused_before_anything_is_touched(model, tmp_path, capsys, where):
    """-o holding the source (with --overwrite it would be deleted) or inside it (writing would pollute it),
    directly or through a symlink: refused in one sentence, nothing written or removed."""
    src = tmp_path / "src"
    (tmp_path / "link").symlink_to(src)
    out = {"parent": tmp_path, "inside": src / "quantized",
           "symlink_to_source": tmp_path / "link", "inside_via_symlink": tmp_path / "link" / "q"}[where]
    before, listing = tree_digest(model), sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(["rtn", model, "-o", out, "--overwrite", "--group-size", "32"], capsys)
    fragment = "is the source model" if where == "symlink_to_source" else (
        "contains the source model" if where == "parent" else "inside the source model")
    assert_refused(code, err, fragment)
    assert tree_digest(model) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


def test_output_holding_the_files_a_source_links_to_is_refused(tmp_path, capsys):
    """A source whose files are links into another folder (the Hugging Face cache's snapshots -> blobs):
    -o on that folder with --overwrite would delete the weights."""
    real = save_tiny_model("llama", tmp_path / "blobs")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for f in real.iterdir():
        (snap / f.name).symlink_to(f)
    before = tree_digest(real)
    code, err = run_cli(["rtn", snap, "-o", real, "--overwrite", "--group-size", "32"], capsys)
    assert_refused(code, err, "through a symbolic link")
    assert tree_digest(real) == before


def test_output_folder_follows_the_umask(model, tmp_path, capsys):
    """Every file too: safetensors writes 0600, so the AWQ search file was unreadable to a server of another user."""
    old = os.umask(0o022)
    try:
        code, _ = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
        code_awq, _ = run_cli(["awq", model, "-o", tmp_path / "awq", "--group-size", "32", "--n-samples", "4",
                               "--seqlen", "32", "--held-out", "0"], capsys)
    finally:
        os.umask(old)
    assert code == 0 and code_awq == 0
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert not (tmp_path / "out" / ".qtool-owner").exists()
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.glob("awq/**/*") if p.is_file()}
    assert "awq/qtool/awq_search.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(model, tmp_path, capsys, caplog):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename
    left, live = tmp_path / ".out.tmp-killed", tmp_path / ".out.tmp-running"
    for d, pid in ((left, dead.pid), (live, os.getpid())):
        d.mkdir()
        (d / ".qtool-owner").write_text(f"{host} {pid}")
        (d / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="quant.output"):
        code, _ = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert code == 0
    assert not left.exists() and live.exists()  # a run still going is left alone
    assert "stopped before it finished" in caplog.text


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_a_source_whose_tensors_do_not_match_its_config_is_refused(model, tmp_path, capsys, change):
    """transformers would initialise a missing tensor at random (and drop an unknown one) and go on, and raise
    after its load report where a shape differs; qtool ppl and the methods refuse each in one sentence, without
    transformers' report."""
    import logging

    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    if change == "missing":
        del tensors["model.layers.1.mlp.down_proj.weight"]
    elif change == "unexpected":
        tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(4, 4)
    else:
        tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :-32].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    why = {"missing": "model.layers.1.mlp.down_proj.weight (they would be random weights)",
           "unexpected": "does not use: model.layers.1.mlp.extra.weight",
           "shape": "weight model.layers.1.mlp.down_proj.weight has shape (64, 96), but config.json gives this model "
                    "(64, 128)"}[change]
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, why)
    _no_output(tmp_path)
    reports = []
    handler = logging.Handler()
    handler.emit = reports.append
    transformers_log = logging.getLogger("transformers.modeling_utils")
    transformers_log.addHandler(handler)
    try:
        code, err = run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32"], capsys)
    finally:
        transformers_log.removeHandler(handler)
    assert_refused(code, err, why, "does not match its config.json")
    assert not [r for r in reports if "LOAD REPORT" in r.getMessage()]


def test_a_damaged_quantized_checkpoint_is_named_in_one_sentence_by_info_and_ppl(model, tmp_path, capsys):
    out = tmp_path / "q"
    assert run_cli(["rtn", model, "-o", out, "--group-size", "32"], capsys)[0] == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # cut short inside its header
    for args in (["info", out], ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(args, capsys), f"{f}: cannot be read as a weight file")


@pytest.mark.parametrize("damage", ["truncated", "bin_not_a_zip"])
def test_a_damaged_weight_file_is_named_in_one_sentence(model, tmp_path, capsys, damage):
    f = model / "model.safetensors"
    if damage == "truncated":  # a download cut short
        f.write_bytes(f.read_bytes()[:1000])
    else:  # an old-style pickle named .bin, which torch cannot map
        f.unlink()
        f = model / "pytorch_model.bin"
        f.write_bytes(b"not a zip archive " * 10)
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, f"{f}: cannot be read as a weight file")
    assert err.rstrip().endswith(")") and "\n" not in err.strip()  # the library's reason whole, on one line
    _no_output(tmp_path)
    if damage == "truncated":  # qtool ppl reads the weights through another path: the same sentence
        assert_refused(*run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32"], capsys),
                       f"{f}: cannot be read as a weight file")


def _edited_checkpoint(model, out, capsys, tensors=None, config=None):
    assert run_cli(["rtn", model, "-o", out, "--group-size", "32"], capsys)[0] == 0
    if tensors:
        f = out / "model.safetensors"
        t = load_file(str(f))
        tensors(t)
        save_file(t, str(f), metadata={"format": "pt"})
    if config:
        c = json.loads((out / "config.json").read_text())
        config(c)
        (out / "config.json").write_text(json.dumps(c))
    return out


_UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("tensors, config, said", [
    (lambda t: t.pop(f"{_UP}.qweight"), None, f"lacks 1 tensors the model needs, e.g. {_UP}.qweight"),
    (lambda t: t.pop(f"{_UP}.scales"), None, f"lacks 1 tensors the model needs, e.g. {_UP}.scales"),
    (lambda t: t.update({f"{_UP}.qweight": t[f"{_UP}.qweight"][:, :-1].clone()}), None,
     f"{_UP}.qweight has shape [64, 15], but quantization_config's bits=4 and group size 32 with the layer sizes "
     "make it [64, 16]"),
    (lambda t: t.update({f"{_UP}.qweight": t[f"{_UP}.qweight"].float()}), None,
     f"{_UP}.qweight is F32, but packed qweight tensors are int32"),
    (lambda t: t.update({"model.layers.0.mlp.extra.scales": torch.ones(1, 8, dtype=torch.float16)}), None,
     "model.layers.0.mlp.extra.qweight/scales/qzeros belong to no module"),
    # a bias on a quantized linear of a model without one (attention_bias false): transformers and vLLM drop it,
    # qtool added it to the layer and scored that
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.full((64,), 3.0, dtype=torch.float16)}), None,
     "holds 1 tensor the model does not use, e.g. model.layers.0.self_attn.q_proj.bias"),
    (None, lambda c: c.update({"quantization_config": "awq"}), "quantization_config is \"awq\", not an object"),
    (None, lambda c: c.update({"intermediate_size": 2 * c["intermediate_size"]}), "the layer sizes make it"),
    (None, lambda c: c["quantization_config"].update({"group_size": 0}), "group size is 0; it must be a positive"),
    (None, lambda c: c["quantization_config"].update({"group_size": 96}), "group size 96 with the layer sizes"),
    (None, lambda c: c["quantization_config"].update({"group_size": 48}),  # scales of ceil(64 / 48) groups, as AutoGPTQ
     "gate_proj has 64 input features, not a multiple of quantization_config's group size 48; its last group"),
    (None, lambda c: c["quantization_config"].update({"zero_point": False}), "quantization_config.zero_point is false"),
    (None, lambda c: c["quantization_config"].update({"modules_to_not_convert": [_UP]}),
     f"modules_to_not_convert keeps {_UP} in full precision, but the checkpoint stores it quantized"),
    (None, lambda c: c["quantization_config"].update({"modules_to_not_convert": ["model.layers.0.mlp"]}),
     "modules_to_not_convert keeps model.layers.0.mlp.down_proj in full precision"),  # transformers: a prefix
])
def test_a_quantized_checkpoint_that_does_not_fit_its_config_is_refused_by_info_and_ppl(model, tmp_path, capsys,
                                                                                        tensors, config, said):
    """A missing, extra, wrong-shaped or wrong-typed packed tensor, or a config.json that does not describe the
    tensors: info said such a checkpoint was read right by every loader, ppl gave a traceback or blamed the
    tensors that were fine."""
    out = _edited_checkpoint(model, tmp_path / "q", capsys, tensors, config)
    for args in (["info", out], ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(args, capsys), said)


def test_a_quantized_checkpoint_without_its_quantization_config_is_said_to_be_so(model, tmp_path, capsys):
    """ppl read it as a full-precision model and said it lacked model.layers.0...weight (random weights); the
    sentence named the weights, not the quantization_config that was lost."""
    out = _edited_checkpoint(model, tmp_path / "q", capsys, None, lambda c: c.pop("quantization_config"))
    assert_refused(*run_cli(["ppl", out, "--max-tokens", "64", "--seqlen", "32"], capsys),
                   "holds packed weights (model.layers.0.", "but config.json has no quantization_config")


def test_a_quantized_checkpoint_whose_tied_lm_head_holds_other_values_is_refused(model, tmp_path, capsys):
    """As for a full-precision folder: config.json ties lm_head to the embedding but the checkpoint stores another
    lm_head; transformers would use the stored one, vLLM the embedding (ppl scored the embedding's, silently).
    A stored copy of the same values is read."""
    def tie(c):
        c["tie_word_embeddings"] = True

    out = _edited_checkpoint(model, tmp_path / "q", capsys, None, tie)
    args = ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]
    f = out / "model.safetensors"
    t = load_file(str(f))
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, str(f), metadata={"format": "pt"})
    assert run_cli(args, capsys)[0] == 0
    t["lm_head.weight"] = torch.randn_like(t["model.embed_tokens.weight"])
    save_file(t, str(f), metadata={"format": "pt"})
    assert_refused(*run_cli(args, capsys), "stores lm_head.weight with other values than model.embed_tokens.weight",
                   "config.json ties the two (tie_word_embeddings)")


@pytest.mark.parametrize("record", ["garbage", "[]", '{"qtool": 5}', '{"qtool": {"config": "x", "report": [1]}}'])
def test_info_reads_a_checkpoint_whose_qtool_json_is_damaged(model, tmp_path, capsys, record):
    """qtool.json only says which method made the checkpoint: a damaged one is skipped with a warning (info gave a
    JSONDecodeError or AttributeError traceback; ppl already read such a checkpoint)."""
    out = _edited_checkpoint(model, tmp_path / "q", capsys, None, None)
    (out / "qtool.json").write_text(record)
    code, err, printed = run_cli_out(["info", out], capsys)
    assert code == 0, err
    assert "AWQ" in printed or "awq" in printed


@pytest.mark.parametrize("tokens", ["-5", "1", "0"])
def test_ppl_refuses_a_max_tokens_that_scores_nothing_sensible(model, capsys, tokens):
    """--max-tokens -5 scored all but the last 5 tokens and printed that as a success."""
    assert_refused(*run_cli(["ppl", model, "--max-tokens", tokens, "--seqlen", "32"], capsys), f"--max-tokens {tokens}")


@pytest.mark.parametrize("options,said", [("--seqlen 0", "--seqlen 0: a window needs at least 2 tokens"),
                                          ("--stride 0", "--stride 0 must lie between 1 and --seqlen 512"),
                                          ("--max-tokens 0", "--max-tokens 0: score at least 2 tokens"),
                                          ("--kv int4 --kv-window 100000", "--kv-window 100000 keeps every earlier")])
def test_ppl_refuses_window_settings_before_reading_the_model(model, capsys, monkeypatch, options, said):
    """ppl refused these only after the model was read (minutes for a large one)."""
    def no_read(*args, **kwargs):
        raise AssertionError("the model was read before the options were checked")

    monkeypatch.setattr(quant, "load_any", no_read)
    assert_refused(*run_cli(["ppl", model, *options.split()], capsys), said)


@pytest.mark.parametrize("command", [["rtn"], ["ppl", "--max-tokens", "64", "--seqlen", "32"]])
def test_a_weight_stored_as_integers_is_refused_not_cast(model, tmp_path, capsys, command):
    """An int32 weight in a full-precision folder: rtn gave a traceback; ppl cast the codes to floats and printed
    a perplexity of that model as a success."""
    f = model / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    out = ["-o", tmp_path / "out"] if command[0] == "rtn" else []
    code, err, printed = run_cli_out([command[0], model, *out, *command[1:]], capsys)
    assert_refused(code, err, f"{f}: {name} is stored as", "but the model holds floats there")
    assert "perplexity" not in printed.lower()
    _no_output(tmp_path)


@pytest.mark.parametrize("change", ["integers", "shape"])
def test_ppl_refuses_a_mismatched_weight_before_reading_any_weight(model, capsys, monkeypatch, change):
    """The checks of a full-precision folder need only the file headers: ppl refused an integer weight only after
    transformers had read the whole model (minutes for a large one, behind its load bar)."""
    from transformers import AutoModelForCausalLM

    from quant.source import SourceModel

    f = model / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.int32) if change == "integers" else tensors[name][:-8].clone()
    save_file(tensors, str(f), metadata={"format": "pt"})

    def no_read(*args, **kwargs):
        raise AssertionError("weight data read before the folder was checked")

    monkeypatch.setattr(SourceModel, "_read_stored", no_read)
    monkeypatch.setattr(SourceModel, "_stored_slices", no_read)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_read)
    why = "is stored as int32" if change == "integers" else "has shape (120, 64), but config.json gives this model"
    assert_refused(*run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32"], capsys), name, why)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"])
def test_ppl_in_float16_refuses_a_weight_float16_cannot_hold_and_says_so(model, capsys, name):
    """A finite float32 weight beyond float16's range turns inf under --dtype float16: ppl said the model holds NaN
    or inf and "is damaged" (a block weight), or read an inf embedding without a word (read a slice at a time)."""
    f = model / "model.safetensors"
    tensors = load_file(str(f))
    tensors[name][0, 0] = 1e6
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert_refused(*run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32", "--dtype", "float16"], capsys),
                   f"--dtype float16: {name} holds values up to 1e+06, beyond float16's 65504 (they would be inf)")
    code, err, printed = run_cli_out(["ppl", model, "--max-tokens", "64", "--seqlen", "32", "--dtype", "bfloat16"],
                                     capsys)
    assert code == 0 and "perplexity" in printed.lower(), err


def test_a_quantized_checkpoint_in_float16_refuses_a_weight_float16_cannot_hold(model, tmp_path, capsys):
    """A bfloat16 embedding beyond float16's range in a quantized checkpoint, scored with --dtype float16: ppl read
    it as inf and printed a perplexity (or blamed a damaged folder where the text held the inf token)."""
    name = "model.embed_tokens.weight"

    def big_embedding(t):
        t[name] = t[name].to(torch.bfloat16)
        t[name][0, 0] = 1e6

    out = _edited_checkpoint(model, tmp_path / "q", capsys, big_embedding)
    args = ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]
    assert_refused(*run_cli([*args, "--dtype", "float16"], capsys),
                   f"--dtype float16: {name} holds values up to 999424, beyond float16's 65504 (they would be inf)")
    code, err, printed = run_cli_out(args, capsys)  # float32 holds it
    assert code == 0 and "perplexity" in printed.lower(), err


@pytest.mark.parametrize("key,value", [("dtype", "auto"), ("torch_dtype", "auto"), ("dtype", ["float16"]),
                                       ("dtype", "float8_e4m3fn"), ("torch_dtype", "int8"), ("dtype", 123)])
@pytest.mark.parametrize("command", [["rtn", "-o", "OUT"], ["ppl", "--max-tokens", "64", "--seqlen", "32"]])
def test_a_config_dtype_no_model_loads_in_is_said_in_one_sentence(model, tmp_path, capsys, key, value, command):
    """config.json with "dtype": "auto" ended every command in transformers' AttributeError traceback, a list in an
    IndexError, float8 in a TypeError; "int8" was read by some commands and refused by others as if --dtype said it."""
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps({**cfg, key: value}))
    args = [command[0], model, *[tmp_path / "out" if a == "OUT" else a for a in command[1:]]]
    assert_refused(*run_cli(args, capsys),
                   f'{model / "config.json"}: {key} {json.dumps(value)} is not a dtype a model is loaded in')
    _no_output(tmp_path)


def test_a_loss_whose_perplexity_no_float_holds_is_one_sentence(model, capsys):
    """A finite model whose mean loss is above 709 nats: exp() overflowed in a traceback (OverflowError)."""
    f = model / "model.safetensors"
    tensors = load_file(str(f))
    name = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    tensors[name][3] = 1e6  # every position predicts token 3 by a margin of millions of nats
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert_refused(*run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32"], capsys),
                   "nats per token, so the perplexity is beyond any float")


def test_rotary_inv_freq_tensors_of_older_checkpoints_are_dropped_as_transformers_drops_them(model, tmp_path, capsys):
    """Llama checkpoints written before transformers stopped storing it carry a rotary inv_freq per layer (the
    AutoGPTQ checkpoints of Llama-2 too): rtn refused the source, ppl and info the quantized checkpoint."""
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(2)}
    f = model / "model.safetensors"
    save_file({**load_file(str(f)), **inv_freq}, str(f), metadata={"format": "pt"})
    assert run_cli(["rtn", model, "-o", tmp_path / "q", "--group-size", "32"], capsys)[0] == 0
    q = tmp_path / "q" / "model.safetensors"
    save_file({**load_file(str(q)), **inv_freq}, str(q), metadata={"format": "pt"})
    assert run_cli(["info", tmp_path / "q"], capsys)[0] == 0
    assert run_cli(["ppl", tmp_path / "q", "--max-tokens", "64", "--seqlen", "32"], capsys)[0] == 0


def test_a_checkpoint_with_an_unknown_tensor_is_refused_by_load(model, tmp_path, capsys):
    code, _ = run_cli(["rtn", model, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert code == 0
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.extra.qweight_typo"] = torch.zeros(2, 2, dtype=torch.int32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    code, err = run_cli(["ppl", tmp_path / "q", "--max-tokens", "64", "--seqlen", "32"], capsys)
    assert_refused(code, err, "does not use", "model.layers.0.mlp.extra.qweight_typo")


def test_a_checkpoint_with_an_older_qtools_search_file_beside_the_weights_loads(model, tmp_path, capsys):
    code, _ = run_cli(["rtn", model, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert code == 0
    save_file({"model.layers.0.mlp.up_proj.awq_scale": torch.ones(64)}, str(tmp_path / "q" / "qtool_search.safetensors"))
    code, err = run_cli(["ppl", tmp_path / "q", "--max-tokens", "64", "--seqlen", "32", "--device", "cpu"], capsys)
    assert code == 0, err


def test_an_autoawq_checkpoint_with_a_legacy_quant_config_json_is_read(model, tmp_path, capsys):
    """Older AutoAWQ wrote its settings to quant_config.json only: qtool ppl once scored such a folder as a
    full-precision model with random linears."""
    code, _ = run_cli(["awq", model, "-o", tmp_path / "q", "--group-size", "32", "--n-samples", "4", "--seqlen", "32",
                       "--held-out", "0", "--dtype", "float32"], capsys)
    assert code == 0
    args = ["--max-tokens", "96", "--seqlen", "32", "--device", "cpu"]
    code, _, out_new = run_cli_out(["ppl", tmp_path / "q", *args], capsys)
    assert code == 0
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "q" / "quant_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}))
    code, _, out_legacy = run_cli_out(["ppl", tmp_path / "q", *args], capsys)
    assert code == 0
    ppl = [line.split("|")[3].strip() for line in (out_new, out_legacy)
           for line in line.splitlines() if str(tmp_path / "q") in line]
    assert len(ppl) == 2 and ppl[0] == ppl[1], (out_new, out_legacy)
    from quant.info import checkpoint_info  # AutoAWQ 0.2.9, transformers and vLLM read config.json alone

    loaders = checkpoint_info(tmp_path / "q").loaders
    assert all("config.json declares no quantization_config" in loaders[n] for n in ("autoawq", "transformers"))
    assert "it reads quant_config.json first" in loaders["gptqmodel"]


def test_a_folder_without_a_tokenizer_is_refused_before_the_model_loads(model, tmp_path, capsys):
    for f in os.listdir(model):
        if f.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(os.path.join(model, f))
    code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, "has no tokenizer that loads")
    _no_output(tmp_path)
    code, err = run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32"], capsys)
    assert_refused(code, err, "has no tokenizer that loads")
    code, _ = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert code == 0  # round-to-nearest reads no text


@pytest.mark.parametrize("damage", ["truncated", "dangling link", "config only"])
def test_a_damaged_tokenizer_is_refused_by_rtn_too(model, tmp_path, capsys, damage):
    # RTN reads no text, but its checkpoint carries the source's tokenizer: a damaged one is not copied on
    if damage == "truncated":
        (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    elif damage == "dangling link":
        (model / "tokenizer.json").unlink()
        (model / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    else:  # tokenizer_config.json without any vocabulary
        for f in model.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and f.name != "tokenizer_config.json":
                f.unlink()
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, "tokenizer")
    _no_output(tmp_path)


@pytest.mark.parametrize("args,fragment", [(["--seqlen", "1"], "--seqlen 1"), (["--stride", "0"], "--stride 0"),
                                           (["--seqlen", "32", "--stride", "64"], "--stride 64")])
def test_perplexity_windows_that_cannot_work_are_refused(model, capsys, args, fragment):
    code, err = run_cli(["ppl", model, "--max-tokens", "64", *args], capsys)
    assert_refused(code, err, fragment)


@pytest.mark.parametrize("command", [["ppl", "--max-tokens", "4096"], ["awq", "--n-samples", "2"],
                                     ["gptq", "--n-samples", "2"], ["kv", "calibrate", "--n-samples", "2"]])
def test_windows_past_learned_position_embeddings_are_refused(tmp_path, capsys, command):
    # Scoring and every calibration path (quantization, KV ranges): one sentence, not an IndexError.
    src = save_tiny_model("opt", tmp_path / "opt")
    max_pos = json.loads((src / "config.json").read_text())["max_position_embeddings"]
    target = tmp_path / ("out.safetensors" if command[0] == "kv" else "out")  # kv calibrate writes one file
    out = [] if command[0] == "ppl" else ["-o", target]
    *cmd, opt, value = command
    code, err = run_cli([*cmd, src, *out, opt, value, "--seqlen", str(max_pos + 1)], capsys)
    assert_refused(code, err, "learned position embeddings", f"--seqlen {max_pos} or less")
    assert not target.exists()


def test_a_non_finite_perplexity_is_never_printed(model, capsys):
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 6e4)  # fp16 logits overflow
    save_file(tensors, f, metadata={"format": "pt"})
    code, err, out = run_cli_out(["ppl", model, "--max-tokens", "64", "--seqlen", "32", "--dtype", "float16",
                                  "--device", "cpu"], capsys)
    assert_refused(code, err, "not finite", "float32", "first in model.norm")
    assert "nan" not in out.lower() and "inf" not in out.lower()


def test_a_model_that_predicts_nothing_gets_no_perplexity(model, capsys):
    """Embeddings of 1e20 square to inf in float32: every RMSNorm scales by rsqrt(inf) = 0, the logits are one value
    for the whole vocabulary, and the loss is finite: ppl printed the vocabulary's size as the perplexity."""
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    tensors["model.embed_tokens.weight"] = torch.full_like(tensors["model.embed_tokens.weight"], 1e20)
    save_file(tensors, f, metadata={"format": "pt"})
    code, err, out = run_cli_out(["ppl", model, "--max-tokens", "64", "--seqlen", "32", "--device", "cpu"], capsys)
    assert_refused(code, err, "predicts nothing at 62 of 62 scored tokens", "first in model.layers.0.input_layernorm")
    assert "perplexity" not in out.lower()


def test_a_nan_weight_is_named_by_ppl_not_blamed_on_float16(model, capsys):
    """A float32 model with a NaN weight: ppl advised scoring in float32 (what it did) because float16 overflows."""
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    code, err, out = run_cli_out(["ppl", model, "--max-tokens", "64", "--seqlen", "32", "--device", "cpu"], capsys)
    assert_refused(code, err, "model.layers.1.mlp.down_proj.weight holds NaN or inf values", "damaged")
    assert "float16" not in err and "nan" not in out.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused(model, tmp_path, capsys):
    code, err = run_cli(["ppl", model, "--max-tokens", "64", "--seqlen", "32", "--device", "cuda"], capsys)
    assert_refused(code, err, "--device cuda", "no CUDA GPU")
    code, err = run_cli(["awq", model, "-o", tmp_path / "out", "--group-size", "32", "--device", "cuda"], capsys)
    assert_refused(code, err, "--device cuda", "no CUDA GPU")


def test_weights_beyond_the_float16_scale_range_stay_in_full_precision_and_are_listed(model, tmp_path, capsys):
    """A bf16/fp32 source can hold weights whose group scale float16 cannot store: such a layer is listed and
    kept in full precision, not clamped silently."""
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    w[0, 0] = 2e6  # its group's scale (max - min) / 15 > 65504
    save_file(tensors, f, metadata={"format": "pt"})
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert code == 0, err
    skipped = json.loads((tmp_path / "out" / "qtool.json").read_text())["qtool"]["report"]["skipped"]
    assert list(skipped) == ["model.layers.0.mlp.up_proj"] and "beyond float16" in skipped["model.layers.0.mlp.up_proj"]
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" in out and "model.layers.1.mlp.up_proj.qweight" in out
    # float16 would make it inf: the checkpoint is written in bfloat16, which holds it.
    assert out["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert float(out["model.layers.0.mlp.up_proj.weight"][0, 0]) == float(torch.tensor(2e6).bfloat16())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out16", "--group-size", "32", "--dtype", "float16"], capsys)
    assert_refused(code, err, "--dtype float16", "model.layers.0.mlp.up_proj.weight", "beyond float16")


@pytest.mark.parametrize("value,finite", [(65519.0, True), (65520.0, False)])
def test_float16_takes_every_value_that_rounds_to_a_finite_float16(model, tmp_path, capsys, value, finite):
    """float16 rounds to nearest: 65519 is stored as its largest value 65504, 65520 becomes inf. The first is
    written in float16 (asked for, or by default), the second refused with --dtype float16."""
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    tensors["model.norm.weight"][0] = value
    save_file(tensors, f, metadata={"format": "pt"})
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32", "--dtype", "float16"], capsys)
    if not finite:
        assert_refused(code, err, "--dtype float16", "model.norm.weight", "65520", "would be inf")
        return
    assert code == 0, err
    norm = load_file(str(tmp_path / "out" / "model.safetensors"))["model.norm.weight"]
    assert norm.dtype == torch.float16 and float(norm[0]) == 65504.0
    code, err = run_cli(["rtn", model, "-o", tmp_path / "auto", "--group-size", "32"], capsys)
    assert code == 0, err
    assert load_file(str(tmp_path / "auto" / "model.safetensors"))["model.norm.weight"].dtype == torch.float16


def test_a_weight_beyond_bfloat16s_range_is_written_in_float32_or_refused(model, tmp_path, capsys):
    """bfloat16 holds float32's exponents but not its last 0.3%: a float32 block norm of 3.4e38 was written as inf
    in a bfloat16 checkpoint (chosen because float16 cannot hold it) without a word. By default the checkpoint
    is written in float32, which holds it; --dtype bfloat16 is refused, with no output left."""
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.0.input_layernorm.weight"][1] = 3.4e38
    save_file(tensors, f, metadata={"format": "pt"})
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert code == 0, err
    assert "writing the checkpoint in float32, not float16" in err
    norm = load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.0.input_layernorm.weight"]
    assert norm.dtype == torch.float32 and float(norm[1]) == float(torch.tensor(3.4e38))
    # the norm's output overflows: said with the dtype as the options spell it
    assert_refused(*run_cli(["ppl", tmp_path / "out", "--max-tokens", "64", "--seqlen", "32"], capsys),
                   "the model's activations are not, in float32, first in model.layers.0.input_layernorm")
    code, err = run_cli(["rtn", model, "-o", tmp_path / "bf16", "--group-size", "32", "--dtype", "bfloat16"],
                        capsys)
    assert_refused(code, err, "--dtype bfloat16: model.layers.0.input_layernorm.weight holds values up to 3.4e+38, "
                   "beyond bfloat16's", "(they would be inf); use --dtype float32")
    assert not [p.name for p in tmp_path.iterdir() if "bf16" in p.name]
    tensors["model.layers.0.input_layernorm.weight"][1] = 1.0
    tensors["model.embed_tokens.weight"][5, 1] = -3.4e38  # outside the blocks: read a slice at a time
    save_file(tensors, f, metadata={"format": "pt"})
    code, err = run_cli(["rtn", model, "-o", tmp_path / "bf16", "--group-size", "32", "--dtype", "bfloat16"],
                        capsys)
    assert_refused(code, err, "--dtype bfloat16: model.embed_tokens.weight holds values up to 3.4e+38")
    assert not [p.name for p in tmp_path.iterdir() if "bf16" in p.name]


def test_an_overflow_under_dtype_auto_names_what_chose_the_dtype(model, tmp_path, capsys):
    """Where no --dtype was given, the dtype comes from config.json: an overflow was blamed on "--dtype float16"
    all the same (ppl on a GPU, the Python API's loaders)."""
    from quant.model_io import load_fp_model

    c = json.loads((model / "config.json").read_text())
    c["dtype"] = "float16"
    (model / "config.json").write_text(json.dumps(c))
    f = model / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(QtoolError) as e:
        load_fp_model(model, "auto")
    assert str(e.value).startswith("config.json's dtype float16 (what --dtype auto reads): "
                                   "model.layers.0.mlp.up_proj.weight holds values up to 1e+06, beyond float16's"), e
    with pytest.raises(QtoolError, match="^--dtype float16: model.layers.0.mlp.up_proj.weight holds"):
        load_fp_model(model, "float16")

    def big_embedding(t):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].to(torch.bfloat16)
        t["model.embed_tokens.weight"][0, 0] = 1e6

    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 0.5
    save_file(tensors, str(f), metadata={"format": "pt"})
    out = _edited_checkpoint(model, tmp_path / "q", capsys, big_embedding)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    with pytest.raises(QtoolError, match="^config.json's dtype float16: model.embed_tokens.weight holds values up "
                                         "to 999424, beyond float16's"):
        quant.load(out)


@pytest.mark.parametrize("size,said", [
    ("1.5GB", "--max-shard-size '1.5GB' is not a size; write a whole number and one of the units KB, MB, GB, KiB"),
    ("1TB", "(those transformers reads), e.g. 1500MB, 4GB, 2GiB or 1000GB"),
    ("lots", "--max-shard-size 'lots' is not a size"), ("500KB", "--max-shard-size '500KB' is below 1MB"),
    ("8gb", "--max-shard-size '8gb' ends in a lower-case b, which reads as bits (8gb is 1GB); write a capital B for "
            "bytes, e.g. 8GB")])  # was 1GB shards, in silence
def test_a_max_shard_size_that_is_no_size_is_one_sentence(model, tmp_path, capsys, size, said):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32", "--max-shard-size", size], capsys)
    assert_refused(code, err, said)
    _no_output(tmp_path)


@pytest.mark.parametrize("method,said", [
    (["awq"], "decoder block 0's output holds NaN or inf in float32, so AWQ's loss judge has no gradient"),
    (["awq", "--judge", "error"], "the calibration activations at decoder block 1's input hold NaN or inf"),
    (["gptq"], "the calibration activations at decoder block 1's input hold NaN or inf")])
def test_activations_that_overflow_on_the_calibration_text_are_one_sentence(model, tmp_path, capsys, method, said):
    """Query and key weights of 1e30 (finite, float32 holds them) make every attention score inf: AWQ's loss
    gradients ended in torch.multinomial's traceback, AWQ judged by the error and GPTQ fell back to RTN block by
    block and wrote a checkpoint as if all was well."""
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    for proj in ("q_proj", "k_proj"):
        tensors[f"model.layers.0.self_attn.{proj}.weight"][:] = 1e30
    save_file(tensors, f, metadata={"format": "pt"})
    code, err = run_cli([*method, model, "-o", tmp_path / "out", "--group-size", "32", "--n-samples", "8",
                         "--seqlen", "64"], capsys)
    assert_refused(code, err, said)
    _no_output(tmp_path)


def test_kv_calibration_of_keys_that_overflow_writes_nothing(model, capsys):
    """Keys of inf/NaN (attention weights of 1e30) were written as NaN ranges, named in config.json, and reported
    as a success; ppl then refused the file and told the user to calibrate again, which wrote it again."""
    f = os.path.join(model, "model.safetensors")
    tensors = load_file(f)
    for proj in ("q_proj", "k_proj"):
        tensors[f"model.layers.0.self_attn.{proj}.weight"][:] = 1e30
    save_file(tensors, f, metadata={"format": "pt"})
    config = (model / "config.json").read_bytes()
    code, err = run_cli(["kv", "calibrate", model, "--n-samples", "4", "--seqlen", "64"], capsys)
    assert_refused(code, err, "keys hold NaN or inf on the calibration text")
    assert (model / "config.json").read_bytes() == config and not (model / "qtool").exists()


def test_an_already_quantized_folder_as_a_source_is_refused(model, tmp_path, capsys):
    code, _ = run_cli(["rtn", model, "-o", tmp_path / "q", "--group-size", "32"], capsys)
    assert code == 0
    code, err = run_cli(["awq", tmp_path / "q", "-o", tmp_path / "qq", "--group-size", "32"], capsys)
    assert_refused(code, err, "is already quantized (awq quantization)", "full-precision")


def test_skip_lm_head_is_accepted_as_a_no_op(model, tmp_path, capsys):
    """lm_head is never quantized; AutoAWQ users pass it out of habit."""
    code, _ = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32", "--skip", "lm_head"], capsys)
    assert code == 0


@pytest.mark.parametrize("name,hint", [("mlp.down_prj", "did you mean mlp.down_proj"),
                                       ("model.layers.9.mlp.down_proj", "did you mean"),
                                       ("attention", "named like")])
def test_a_skip_name_that_matches_no_linear_is_refused(model, tmp_path, capsys, name, hint):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32", "--skip", "mlp.up_proj",
                         "--skip", name], capsys)
    assert_refused(code, err, f"--skip {name}", hint)
    _no_output(tmp_path)


@pytest.mark.parametrize("name", ["", " ", "."])
def test_an_empty_skip_name_is_refused_as_empty(model, tmp_path, capsys, name):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32", "--skip", name], capsys)
    assert_refused(code, err, f"--skip {name!r}: an empty name matches no linear", "such as")
    _no_output(tmp_path)


def test_skip_names_that_match_are_kept_in_full_precision(model, tmp_path, capsys):
    code, _ = run_cli(["rtn", model, "-o", tmp_path / "out", "--group-size", "32", "--skip", "mlp.up_proj",
                       "--skip", "model.layers.1.self_attn.o_proj"], capsys)
    assert code == 0
    names = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert "model.layers.0.mlp.up_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert "model.layers.1.self_attn.o_proj.weight" in names and "model.layers.0.self_attn.o_proj.qweight" in names


@pytest.mark.parametrize("resumable", [False, True])
def test_an_output_another_run_wrote_meanwhile_is_not_replaced_without_overwrite(tmp_path, resumable):
    """Two runs to one -o: the one that finishes second does not replace the first's checkpoint; it leaves
    nothing behind (its block parts are merged already, so a resume could not use them)."""
    from quant import output, resume
    from quant.errors import QtoolError

    out = tmp_path / "out"
    with pytest.raises(QtoolError, match="appeared while this run worked.*pass --overwrite"):
        with output.atomic_output(out, resume_key={"k": 1} if resumable else None) as tmp:
            (tmp / "model.safetensors").write_text("mine")
            if resumable:
                (tmp / resume.PROGRESS).write_text("{}")
            out.mkdir()
            (out / "model.safetensors").write_text("theirs")
    assert (out / "model.safetensors").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_location_not_writable(model, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the permission check report what chmod would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(parent) else real(p, m))
    else:
        parent.chmod(0o500)
    try:
        code, err = run_cli(["rtn", model, "-o", parent / "out", "--group-size", "32"], capsys)
    finally:
        parent.chmod(0o700)
    assert_refused(code, err, "is not writable")
    assert list(parent.iterdir()) == []


def test_output_parent_missing(model, tmp_path, capsys):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "no" / "such" / "out"], capsys)
    assert_refused(code, err, "does not exist")


def test_ppl_data_missing(model, tmp_path, capsys):
    code, err = run_cli(["ppl", model, "--data", tmp_path / "missing.txt"], capsys)
    assert_refused(code, err, "missing.txt", "no such file")


def test_ppl_data_that_is_a_folder_or_empty(model, tmp_path, capsys):
    """A folder is named as one (it was "no such file"); /dev/null reads as an empty text, refused as one."""
    code, err = run_cli(["ppl", model, "--data", tmp_path], capsys)
    assert_refused(code, err, str(tmp_path), "is a folder")
    code, err = run_cli(["ppl", model, "--data", "/dev/null"], capsys)
    assert_refused(code, err, "0 tokens")
    code, err = run_cli(["ppl", model, "--data", ""], capsys)  # an unset $DATA
    assert_refused(code, err, "--data is blank")


def test_info_on_a_full_precision_model(model, capsys):
    code, err = run_cli(["info", model], capsys)
    assert_refused(code, err, "not a quantized checkpoint")


def test_source_stays_untouched_by_a_failed_run(model, tmp_path, capsys, monkeypatch):
    """A crash halfway (a bug or a full disk while writing) leaves no output but keeps the finished blocks for
    the same command to continue; a refusal halfway (QtoolError: a rerun would meet it again) leaves nothing."""
    import quant.pipeline

    def boom(exc):
        def raise_(*a, **k):
            raise exc
        return raise_

    before = tree_digest(model)
    cmd = ["rtn", model, "-o", tmp_path / "out", "--group-size", "32"]
    monkeypatch.setattr(quant.pipeline, "write_metadata", boom(QtoolError("refused")))
    assert run_cli(cmd, capsys)[0] == 2
    _no_output(tmp_path)
    for exc in (RuntimeError("a bug"), OSError("disk full")):
        monkeypatch.setattr(quant.pipeline, "write_metadata", boom(exc))
        with pytest.raises(type(exc)):
            run_cli(cmd, capsys)
        assert not (tmp_path / "out").exists() and len(list(tmp_path.glob(".out.tmp-*"))) == 1
    monkeypatch.undo()
    assert run_cli(cmd, capsys)[0] == 0
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert tree_digest(model) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_bench_without_a_gpu_is_refused(capsys):
    assert_refused(*run_cli(["bench", "--batch", "1"], capsys), "needs a CUDA GPU")
    code, err = run_cli(["bench", "--group-size", "48"], capsys)
    assert code == 2 and "48" in err


@pytest.mark.parametrize("script, option, runs, said", [
    ("temperature.py", "--runs", "fp=@,rtn=@", "no checkpoint may be named 'fp'"),  # was: replaced the source
    ("temperature.py", "--runs", "rtn=@,rtn=@", "the name 'rtn' is given twice"),
    ("temperature.py", "--runs", "rtn=@,awq", "'awq' is not NAME=CHECKPOINT"),
    ("temperature.py", "--runs", "awq=@", "needs one checkpoint named rtn"),
    ("temperature.py", "--runs", "rtn=@,awq=@/absent", "awq=@/absent: no such checkpoint folder"),  # was: after scoring
    ("temperature.py", "--windows 1 --runs", "rtn=@", "--windows 1: give at least 2"),  # was: "± nan"
    ("check_windows.py", "--candidates", "rtn=@", "no checkpoint may be named 'rtn'"),  # was: replaced --rtn
    ("check_windows.py", "--candidates", "awq=", "'awq=' is not NAME=CHECKPOINT"),
    ("check_windows.py", "--candidates", "awq=@/absent", "awq=@/absent: no such checkpoint folder"),
    ("check_windows.py", "--windows 8,1 --candidates", "awq=@", "--windows 8,1: give whole numbers of at least 2"),
    ("check_windows.py", "--kinds poems --candidates", "awq=@", "'poems' is not a built-in kind of text"),
])
def test_benchmark_scripts_refuse_bad_checkpoint_lists(script, option, runs, said, tmp_path):
    """The benchmark scripts that score NAME=CHECKPOINT lists refuse a bad list, a missing checkpoint or a window
    count no standard error can be taken on, before any model is read (@: an existing folder)."""
    import subprocess
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    (tmp_path / "c").mkdir()
    extra = ["--rtn", str(tmp_path / "c")] if script == "check_windows.py" else []
    r = subprocess.run([sys.executable, str(path), "--model", str(tmp_path / "absent"), *extra, *option.split(),
                        runs.replace("@", str(tmp_path / "c"))], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert said.replace("@", str(tmp_path / "c")) in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_apply_search_is_refused_not_taken_for_a_search(model, tmp_path, capsys, blank):
    """`--apply-search "$UNSET"` ran a whole calibrated search and exited 0 (the blank path was taken for no
    replay); now it is one sentence, exit 2, nothing written. The API's AWQOptions(search_file="") too."""
    code, err = run_cli(["awq", model, "--apply-search", blank, "-o", tmp_path / "out", "--group-size", "32"], capsys)
    assert_refused(code, err, "--apply-search is blank")
    assert not (tmp_path / "out").exists()
    with pytest.raises(QtoolError, match="--apply-search is blank"):
        AWQOptions(search_file=blank)


@pytest.mark.parametrize("args, fragment", [
    (["awq"], "Missing argument 'MODEL_DIR'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["rtn", "somewhere", "--no-such-option"], "No such option '--no-such-option'"),
    (["rtn", "somewhere", "--bits", "four"], "'four' is not a valid integer"),
])
def test_usage_errors_are_one_sentence(args, fragment, capsys):
    """click's own refusals (missing argument, unknown command or option, a value of the wrong type) read like
    qtool's: one line, no usage block, exit 2, naming where the accepted values are listed."""
    code, err = run_cli(args, capsys)
    assert_refused(code, err, fragment, "--help' lists what is accepted")
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("args", [[], ["kv"]])
def test_a_bare_command_group_prints_its_help_not_an_error(args, capsys):
    code, err, out = run_cli_out(args, capsys)
    assert code in (0, 2)
    text = err + out
    assert "Commands:" in text and ("calibrate" if args else "self-calib") in text
    assert "error:" not in text


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.update({next(iter(m)): "model-00009-of-00009.safetensors"}), "names the shard model-00009-of-00009"),
    (lambda m: m.pop(sorted(m)[-1]), "lists no shard for"),
    (lambda m: m.update({"model.layers.0.extra.weight": sorted(m.values())[0]}), "no shard holds it"),
])
def test_a_shard_index_that_disagrees_with_the_shards_is_refused(model, tmp_path, capsys, edit, said):
    """transformers and vLLM load by model.safetensors.index.json; qtool read the shards' headers and called a
    checkpoint whose index names a missing shard, or places a tensor wrongly, healthy (info exit 0, ppl scored it)."""
    out = tmp_path / "q"
    quant.quantize(model, out, method="rtn", group_size=32, max_shard_bytes=60_000, progress=False)  # sharded
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    for args in (["info", out], ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(args, capsys), "model.safetensors.index.json", said)
    shutil.copytree(model, tmp_path / "sharded")  # the same index beside a sharded source
    for f in (tmp_path / "sharded").glob("model*.safetensors"):
        f.unlink()
    tensors = load_file(str(model / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(tmp_path / "sharded" / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(tmp_path / "sharded" / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert run_cli(["rtn", tmp_path / "sharded", "-o", tmp_path / "ok", "--group-size", "32"], capsys)[0] == 0
    edit(weight_map)
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for args in (["rtn", tmp_path / "sharded", "-o", tmp_path / "r", "--group-size", "32"],
                 ["ppl", tmp_path / "sharded", "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(args, capsys), "model.safetensors.index.json", said)


def _shard(model, folder):
    """``model``'s folder copied to ``folder`` with its weights in two shards and an index."""
    shutil.copytree(model, folder)
    (folder / "model.safetensors").unlink()
    tensors = load_file(str(model / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {k: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors" for i, k in enumerate(names)}
    for shard in sorted(set(weight_map.values())):
        save_file({k: tensors[k] for k, f in weight_map.items() if f == shard}, str(folder / shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_safetensors_the_shard_index_does_not_name_are_left_out(model, tmp_path, capsys, caplog):
    """A Mistral repository ships consolidated.safetensors (its own names) beside the index and its shards:
    transformers and vLLM read only the files the index names, so does qtool (it was refused, the index blamed),
    with one warning naming the others. A model.safetensors the index does not name is refused: transformers
    reads it before the index."""
    tensors = _shard(model, tmp_path / "repo")
    save_file({f"layers.{k}": v for k, v in tensors.items()}, str(tmp_path / "repo" / "consolidated.safetensors"))
    assert run_cli(["rtn", model, "-o", tmp_path / "want", "--group-size", "32"], capsys)[0] == 0
    with caplog.at_level("WARNING", logger="quant.folder"):
        assert run_cli(["rtn", tmp_path / "repo", "-o", tmp_path / "got", "--group-size", "32"], capsys)[0] == 0
    assert caplog.text.count("consolidated.safetensors not named in model.safetensors.index.json") == 1
    assert load_file(str(tmp_path / "got" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "want" / "model.safetensors")).keys()
    for k, v in load_file(str(tmp_path / "want" / "model.safetensors")).items():
        assert torch.equal(load_file(str(tmp_path / "got" / "model.safetensors"))[k], v), k
    # a stale model.safetensors: transformers reads it before the index, vLLM the shards: refused
    save_file({k: v * 2 for k, v in tensors.items()}, str(tmp_path / "repo" / "model.safetensors"))
    assert_refused(*run_cli(["rtn", tmp_path / "repo", "-o", tmp_path / "r", "--group-size", "32"], capsys),
                   "holds model.safetensors beside model.safetensors.index.json, which does not name it")


def test_a_tensor_in_two_weight_files_is_refused(model, tmp_path, capsys):
    """Without an index every top-level safetensors file is read: a tensor held by two of them was taken from
    whichever sorted last, without a word (transformers would read model.safetensors alone)."""
    out = tmp_path / "q"
    quant.quantize(model, out, method="rtn", group_size=32, progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k.endswith("scales")}, str(out / "zz-other.safetensors"))
    for args in (["info", out], ["ppl", out, "--max-tokens", "64", "--seqlen", "32"]):
        assert_refused(*run_cli(args, capsys), "is in both model.safetensors and zz-other.safetensors")
    shutil.copytree(model, tmp_path / "repo")
    shutil.copy(model / "model.safetensors", tmp_path / "repo" / "zz-other.safetensors")
    assert_refused(*run_cli(["rtn", tmp_path / "repo", "-o", tmp_path / "r", "--group-size", "32"], capsys),
                   "is in both model.safetensors and zz-other.safetensors")
