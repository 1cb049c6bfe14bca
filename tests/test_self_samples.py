"""Self-calibration (calib.self_samples, `qtool self-calib`): the model's own samples as a calibration text."""
import json

import pytest
import torch
from test_bad_input import assert_refused, run_cli, run_cli_out
from test_pipeline import tree_digest
from tiny_models import save_tiny_model

import calib.self_samples as ss
from calib.data import calibration_batch, load_texts
from quant.errors import QtoolError
from quant.model_io import load_tokenizer

OPTS = ss.SamplingOptions(n_sequences=10, new_tokens=24, batch_size=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("m") / "src")


def _stop_after(monkeypatch, n_batches):
    real, calls = ss._sample_batch, []

    def stop(model_, n, start, opts, seed):
        calls.append(seed)
        if len(calls) > n_batches:
            raise KeyboardInterrupt
        return real(model_, n, start, opts, seed)

    monkeypatch.setattr(ss, "_sample_batch", stop)
    return real


def test_the_file_holds_one_calibration_document_per_sequence_and_feeds_a_calibration_batch(model, tmp_path):
    r = ss.write_self_samples(model, tmp_path / "s.txt", OPTS)
    docs = load_texts(tmp_path / "s.txt")
    assert r.kept == len(docs) == 10 and r.redrawn == 0
    assert not (tmp_path / ("s.txt" + ss.PARTIAL_SUFFIX)).exists()
    ids = calibration_batch(load_tokenizer(model), docs, n_samples=4, seqlen=32, seed=0)
    assert ids.shape == (4, 32)


def test_the_same_seed_gives_the_same_text_and_another_seed_another(model, tmp_path):
    a = ss.write_self_samples(model, tmp_path / "a.txt", OPTS)
    b = ss.write_self_samples(model, tmp_path / "b.txt", OPTS)
    c = ss.write_self_samples(model, tmp_path / "c.txt", ss.SamplingOptions(**{**OPTS.__dict__, "seed": 1}))
    text = [open(r.out).read() for r in (a, b, c)]
    assert text[0] == text[1] and text[0] != text[2]


def test_a_stopped_run_resumes_from_its_finished_batches_and_writes_what_an_unstopped_run_writes(model, tmp_path,
                                                                                                 monkeypatch):
    whole = ss.write_self_samples(model, tmp_path / "whole.txt", OPTS)
    real = _stop_after(monkeypatch, 2)
    out = tmp_path / "r.txt"
    with pytest.raises(KeyboardInterrupt):
        ss.write_self_samples(model, out, OPTS)
    assert not out.exists()  # complete or not at all
    partial = tmp_path / ("r.txt" + ss.PARTIAL_SUFFIX)
    assert len(partial.read_text().splitlines()) == 3  # the key and two finished batches
    monkeypatch.setattr(ss, "_sample_batch", real)
    resumed = ss.write_self_samples(model, out, OPTS)
    assert resumed.resumed_batches == 2
    assert out.read_text() == open(whole.out).read()
    assert not partial.exists()


def test_a_stopped_run_with_other_options_is_not_resumed(model, tmp_path, monkeypatch):
    out = tmp_path / "r.txt"
    partial = tmp_path / ("r.txt" + ss.PARTIAL_SUFFIX)
    other = ss.SamplingOptions(**{**OPTS.__dict__, "t_start": 1.2})
    partial.write_text(json.dumps({"key": ss.settings_key(model, other, "auto", "cpu")}) + "\n"
                       + json.dumps({"batch": 0, "texts": ["not sampled with these options"] * 4, "redrawn": 0}) + "\n")
    r = ss.write_self_samples(model, out, OPTS)
    assert r.resumed_batches == 0 and "not sampled" not in out.read_text()


def test_repetition_loops_are_drawn_again(model, tmp_path, monkeypatch):
    opts = ss.SamplingOptions(n_sequences=6, new_tokens=200, batch_size=4)  # zlib needs a few hundred bytes
    tok = load_tokenizer(model)
    loop = torch.tensor(tok("ab" * 100, add_special_tokens=False)["input_ids"][:200])
    real = ss._sample_batch

    def half_loops(model_, n, start, opts, seed):
        ids = real(model_, n, start, opts, seed)
        ids[1::2] = loop
        return ids

    monkeypatch.setattr(ss, "_sample_batch", half_loops)
    r = ss.write_self_samples(model, tmp_path / "s.txt", opts)
    assert r.kept == 6 and r.redrawn == 5  # batches of 4, 4, 2 and 1 (what is still wanted), every second a loop
    assert "abab" not in (tmp_path / "s.txt").read_text()
    assert r.min_zlib_ratio >= opts.min_zlib_ratio


def test_no_batch_draws_more_sequences_than_the_run_still_wants(model, tmp_path, monkeypatch):
    """10 sequences in batches of 4: the third batch draws 2, not 4 to throw 2 away (each is a whole generation)."""
    real, sizes = ss._sample_batch, []

    def spy(model_, n, start, opts, seed):
        sizes.append(n)
        return real(model_, n, start, opts, seed)

    monkeypatch.setattr(ss, "_sample_batch", spy)
    r = ss.write_self_samples(model, tmp_path / "s.txt", OPTS)
    assert sizes == [4, 4, 2] and r.kept == 10


def test_a_model_that_only_loops_is_refused_in_one_sentence(model, tmp_path, monkeypatch):
    monkeypatch.setattr(ss, "_sample_batch", lambda m, n, s, o, seed: torch.full((n, o.new_tokens), 97))
    with pytest.raises(QtoolError, match="repetition loops"):
        ss.write_self_samples(model, tmp_path / "s.txt", ss.SamplingOptions(n_sequences=4, new_tokens=200))
    assert not (tmp_path / "s.txt").exists()


def test_the_temperature_falls_from_start_to_end_and_divides_the_scores():
    opts = ss.SamplingOptions(new_tokens=17, t_start=1.5, t_end=0.5)
    assert ss.temperature_at(0, opts) == pytest.approx(1.5)
    assert ss.temperature_at(8, opts) == pytest.approx(1.0)
    assert ss.temperature_at(16, opts) == pytest.approx(0.5)
    scores = torch.randn(2, 7)
    proc = ss._FallingTemperature(prompt_len=1, opts=opts)
    assert torch.allclose(proc(torch.zeros(2, 17, dtype=torch.long), scores), scores / 0.5)  # 16 new tokens so far


def test_a_falling_temperature_samples_a_more_likely_ending(model):
    """The schedule reaches the sampler: cold last tokens are more likely under the model than hot ones."""
    from quant import load_any

    m, tok = load_any(model)
    with torch.no_grad():
        m.lm_head.weight.mul_(3)  # a random model predicts almost uniformly: sharpen it so temperature matters
    start = ss.start_token(tok, m.config)

    def mean_logprob(opts):
        ids = ss._sample_batch(m, 16, start, opts, seed=0)
        full = torch.cat([torch.full((16, 1), start), ids], 1)
        with torch.no_grad():
            lp = torch.log_softmax(m(full).logits[:, :-1].float(), -1).gather(2, full[:, 1:, None])[..., 0]
        return lp[:, -8:].mean().item()

    hot = ss.SamplingOptions(new_tokens=24, t_start=1.5, t_end=1.5, top_p=1.0, repetition_penalty=1.0)
    cooling = ss.SamplingOptions(new_tokens=24, t_start=1.5, t_end=0.05, top_p=1.0, repetition_penalty=1.0)
    assert mean_logprob(cooling) > mean_logprob(hot) + 1.0


def test_only_the_top_k_tokens_are_drawn(model):
    """Over the whole vocabulary a hot start draws noise that the model then continues: top-k must reach the sampler."""
    from quant import load_any

    m, tok = load_any(model)
    start = ss.start_token(tok, m.config)
    opts = ss.SamplingOptions(new_tokens=24, t_start=1.5, t_end=1.5, top_k=5, top_p=1.0, repetition_penalty=1.0)
    ids = ss._sample_batch(m, 8, start, opts, seed=0)
    full = torch.cat([torch.full((8, 1), start), ids], 1)
    with torch.no_grad():
        logits = m(full).logits[:, :-1].float()
    rank = (logits > logits.gather(2, full[:, 1:, None])).sum(-1)  # tokens the model ranks above the one drawn
    assert int(rank.max()) < 5


def test_cli_writes_the_file_and_prints_its_table(model, tmp_path, capsys):
    code, err, out = run_cli_out(["self-calib", model, "-o", tmp_path / "s.txt", "--n-sequences", 6, "--tokens", 16,
                                  "--batch-size", 3], capsys)
    assert code == 0, err
    assert "sequences kept" in out and "6" in out and str(tmp_path / "s.txt") in out
    assert len(load_texts(tmp_path / "s.txt")) == 6


@pytest.mark.parametrize("args, fragments", [
    (["--n-sequences", "0"], ["--n-sequences 0"]),
    (["--t-start", "0.5", "--t-end", "0.9"], ["temperatures 0.5 -> 0.9"]),
    (["--top-p", "0"], ["--top-p 0"]),
    (["--tokens", "4"], ["--tokens 4"]),
])
def test_bad_options_are_refused(model, tmp_path, capsys, args, fragments):
    code, err = run_cli(["self-calib", model, "-o", tmp_path / "s.txt", *args], capsys)
    assert_refused(code, err, *fragments)
    assert not (tmp_path / "s.txt").exists()


def test_bad_paths_are_refused_and_the_model_folder_is_left_alone(model, tmp_path, capsys):
    before = tree_digest(model)
    code, err = run_cli(["self-calib", model, "-o", model / "s.txt"], capsys)
    assert_refused(code, err, "inside the model folder")
    code, err = run_cli(["self-calib", model, "-o", tmp_path / "s.json"], capsys)
    assert_refused(code, err, "s.json", ".txt")
    code, err = run_cli(["self-calib", model, "-o", f"{tmp_path / 'own.txt'}/"], capsys)
    assert_refused(code, err, "names a folder")
    assert not (tmp_path / "own.txt").exists()
    code, err = run_cli(["self-calib", tmp_path / "nope", "-o", tmp_path / "s.txt"], capsys)
    assert_refused(code, err, "nope")
    code, err = run_cli(["self-calib", model, "-o", tmp_path / "no" / "s.txt"], capsys)
    assert_refused(code, err, "does not exist")
    (tmp_path / "s.txt").write_text("mine\n")
    code, err = run_cli(["self-calib", model, "-o", tmp_path / "s.txt"], capsys)
    assert_refused(code, err, "already exists", "--overwrite")
    assert (tmp_path / "s.txt").read_text() == "mine\n"
    assert tree_digest(model) == before


def test_a_quantized_checkpoint_is_refused(model, tmp_path, capsys):
    code, err = run_cli(["rtn", model, "-o", tmp_path / "q", "--group-size", 32], capsys)
    assert code == 0, err
    code, err = run_cli(["self-calib", tmp_path / "q", "-o", tmp_path / "s.txt"], capsys)
    assert_refused(code, err, "quantized checkpoint", "full-precision")


def test_an_internlm2_folder_is_sampled_without_its_remote_code(tmp_path):
    """LMDeploy's home family: its folder maps the model to remote code; qtool reads it through its own layout."""
    from internlm_models import llama, save_internlm2

    src = save_internlm2(llama(4, 2), tmp_path / "internlm2")
    r = ss.write_self_samples(src, tmp_path / "s.txt", ss.SamplingOptions(n_sequences=3, new_tokens=16, batch_size=3))
    assert r.kept == 3 and len(load_texts(tmp_path / "s.txt")) == 3


def test_batches_drawn_in_another_dtype_are_not_resumed(model, tmp_path, monkeypatch):
    out = tmp_path / "r.txt"
    real = _stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        ss.write_self_samples(model, out, OPTS)
    monkeypatch.setattr(ss, "_sample_batch", real)
    assert ss.write_self_samples(model, out, OPTS, dtype="bfloat16").resumed_batches == 0


def test_a_damaged_record_ends_what_is_resumed_and_is_cut_off_before_new_records(model, tmp_path, monkeypatch):
    whole = ss.write_self_samples(model, tmp_path / "whole.txt", OPTS)
    out = tmp_path / "r.txt"
    real = _stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        ss.write_self_samples(model, out, OPTS)
    partial = tmp_path / ("r.txt" + ss.PARTIAL_SUFFIX)
    head, rec0, rec1 = partial.read_text().splitlines()
    bad = json.dumps({"batch": 1, "texts": "abc", "redrawn": 0})  # texts must be a list of strings
    partial.write_text("\n".join([head, rec0, bad, rec1]) + "\n" + '{"batch": 2, "te')
    real_partial_exit, kept = ss._PartialFile.__exit__, []

    def look(self, *exc):
        kept.append(self.path.read_text().splitlines())
        return real_partial_exit(self, *exc)

    monkeypatch.setattr(ss._PartialFile, "__exit__", look)
    monkeypatch.setattr(ss, "_sample_batch", real)
    _stop_after(monkeypatch, 1)  # one new batch, then stop again
    with pytest.raises(KeyboardInterrupt):
        ss.write_self_samples(model, out, OPTS)
    lines = kept[-1]
    assert len(lines) == 3 and lines[:2] == [head, rec0] and json.loads(lines[2])["batch"] == 1
    monkeypatch.setattr(ss, "_sample_batch", real)
    r = ss.write_self_samples(model, out, OPTS)
    assert r.resumed_batches == 2 and out.read_text() == open(whole.out).read()


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(model, tmp_path):
    out = tmp_path / "r.txt"
    key = ss.settings_key(model, OPTS, "auto", "cpu")
    with ss._PartialFile(tmp_path / ("r.txt" + ss.PARTIAL_SUFFIX), key):
        with pytest.raises(QtoolError, match="another qtool self-calib run is writing"):
            ss.write_self_samples(model, out, OPTS)
    assert not out.exists()


@pytest.mark.parametrize("args, fragments", [
    (["--tokens", "300"], ["--tokens 300", "max_position_embeddings 256", "255 or less"]),
    (["--seed", str(2**40)], ["--seed", "from 0 to"]),
    (["--batch-size", "100000"], ["--batch-size 100000", "from 1 to"]),
])
def test_values_the_run_cannot_take_are_refused(model, tmp_path, capsys, args, fragments):
    code, err = run_cli(["self-calib", model, "-o", tmp_path / "s.txt", *args], capsys)
    assert_refused(code, err, *fragments)


def test_an_output_name_the_file_system_cannot_hold_is_refused_in_one_sentence(model, tmp_path, capsys):
    code, err = run_cli(["self-calib", model, "-o", tmp_path / ("x" * 250 + ".txt"), "--tokens", 16], capsys)
    assert_refused(code, err, "cannot be written")


def test_a_folder_whose_tokenizer_makes_no_tokens_is_refused(model, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model / name).read_bytes())
    code, err = run_cli(["self-calib", bare, "-o", tmp_path / "s.txt", "--tokens", 16], capsys)
    assert_refused(code, err, "no tokens", "tokenizer files")
    assert list(tmp_path.glob("s.txt*")) == []  # refused before the record of batches is made
