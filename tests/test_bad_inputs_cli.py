"""Bad inputs at the command line: each is refused with one line on stderr naming the file or option (no
traceback), exit code 2 for a user error (1 for a failed run), and nothing written or lost. Also: the VLM API key
never leaves the client, whatever the server echoes; `--relations all` names the folders it ignores."""
import base64
import json
import logging
import os
import re
import runpy
import subprocess
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, local_vlm_server
from dr_train import cli
from dr_train.catalog import load_catalog, select_relations
from dr_train.config import load_config
from dr_train.data.prepare import discover_videos
from dr_train.eval.vlm import VLMClient, VLMError, relation_accuracy
from dr_train.generate import main as generate_main
from dr_train.lora import add_relation_lora_triplet, export_inference_lora, lora_named_parameters
from dr_train.method.triplet import adapter_state_dict
from dr_train.model.presets import tiny_transformer
from dr_train.trainer import NonFiniteLossError

TINY = ["--prompt", "A dog is shaking hands with a cat.", "--preset", "tiny", "--steps", "2", "--num-frames", "7",
        "--height", "16", "--width", "16"]


def one_error_line(err: str) -> str:
    """The single line a refusal prints: exactly one line, 'error: ...', and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ 3, 8: --lora files

@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """An exported LoRA of the tiny model (random weights) and the training-side files of the same adapters."""
    root = tmp_path_factory.mktemp("lora")
    transformer = add_relation_lora_triplet(tiny_transformer(), load_config(None, ["model.preset=tiny"]).lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_named_parameters(transformer).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    exported = export_inference_lora(transformer, root / "lora", ["relation", "ffn"])
    save_file(adapter_state_dict(transformer), str(root / "adapters.safetensors"))      # a checkpoint's adapters
    save_file({f"{name}/exp_avg": torch.zeros(p.shape) for name, p in lora_named_parameters(transformer).items()},
              str(root / "optimizer.safetensors"))                                       # a checkpoint's optimizer
    save_file({"hmt": torch.zeros(2, dtype=torch.uint8), "noise": torch.zeros(2, dtype=torch.uint8)},
              str(root / "rng.safetensors"))                                             # any other tensors
    return {"root": root, "file": exported, "tensors": load_file(str(exported))}


@pytest.mark.parametrize("name,message", [
    ("adapters.safetensors", "holds no LoRA weight: it is a training checkpoint's adapter file"),
    ("optimizer.safetensors", "holds no LoRA weight: it is a training checkpoint's optimizer state"),
    ("rng.safetensors", "holds no LoRA weight: it is not a LoRA"),
    ("missing.safetensors", "does not exist"),
    ("weights.bin", "is not a safetensors file"),
    ("folder", "holds no pytorch_lora_weights.safetensors"),
])
def test_generate_refuses_a_file_that_loads_no_lora_weight(lora, tmp_path, capsys, name, message):
    (lora["root"] / "weights.bin").write_bytes(b"\x80\x04\x95 not safetensors, maybe a pickle")
    (lora["root"] / "folder").mkdir(exist_ok=True)
    out = tmp_path / "out"
    assert generate_main([*TINY, "--lora", str(lora["root"] / name), "--output-dir", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(lora["root"] / name) in line and message in line
    assert not out.exists()                                       # no base-model video recorded as a LoRA video


def _half_matching(lora, path):
    """The LoRA with every other module moved from block i to 70 + i (the tiny model has 2): (kept, moved) modules."""
    modules = sorted({k[:-len(".lora_A.weight")] for k in lora["tensors"] if k.endswith(".lora_A.weight")})
    moved = modules[::2]
    out = {}
    for key, tensor in lora["tensors"].items():
        module = key.rsplit(".lora_", 1)[0]
        out[re.sub(r"blocks\.(\d)\.", r"blocks.7\1.", key) if module in moved else key] = tensor
    save_file(out, str(path))
    return len(modules) - len(moved), moved


def test_a_half_matching_lora_is_refused_naming_the_modules_unless_allowed(lora, tmp_path, capsys):
    path = tmp_path / "half.safetensors"
    kept, moved = _half_matching(lora, path)
    out = tmp_path / "out"
    assert generate_main([*TINY, "--lora", str(path), "--output-dir", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and f"{len(moved)} of its entries match no Linear" in line
    first = moved[0].replace("transformer.transformer_blocks.", "transformer_blocks.7")     # as the model names it
    assert first in line and "--allow-partial-lora" in line and not out.exists()

    assert generate_main([*TINY, "--lora", str(path), "--output-dir", str(out), "--allow-partial-lora"]) == 0
    meta = json.loads((out / "generation.json").read_text())
    assert meta["lora_tensors_applied"] == 2 * kept and meta["lora_file"] == str(path)


def test_a_full_lora_records_every_tensor_applied(lora, tmp_path):
    out = tmp_path / "out"
    assert generate_main([*TINY, "--lora", str(lora["file"].parent), "--output-dir", str(out)]) == 0
    meta = json.loads((out / "generation.json").read_text())
    assert meta["lora_tensors_applied"] == len(lora["tensors"]) > 0 and meta["lora_file"] == str(lora["file"])


def test_wrong_lora_shapes_are_refused_naming_the_module(lora, tmp_path, capsys):
    tensors = dict(lora["tensors"])
    key_a = next(k for k in tensors if k.endswith("lora_A.weight"))
    a = tensors[key_a]
    tensors[key_a] = torch.zeros(a.shape[0], a.shape[1] * 2)              # a LoRA of a wider model
    path = tmp_path / "wide.safetensors"
    save_file(tensors, str(path))
    assert generate_main([*TINY, "--lora", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    module = key_a[len("transformer."):-len(".lora_A.weight")]
    assert str(path) in line and "wrong LoRA shapes" in line and module in line
    assert not (tmp_path / "out").exists()


def test_the_generate_script_exits_2_without_a_traceback(tmp_path):
    """The real entry point, in its own process."""
    missing = tmp_path / "nowhere" / "lora"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), *TINY, "--lora", str(missing),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: LoRA {missing} does not exist"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ 7: config values

@pytest.mark.parametrize("override,option", [
    ("loss.temperature=0", "loss.temperature must be > 0"),
    ("loss.mask_weight=-1", "loss.mask_weight must be >= 0"),
    ("lora.alpha=nan", "lora.alpha must be a finite number"),
    ("lora.rank=0", "lora.rank must be >= 1"),
    ("hmt.probabilities=[0.5,0.5,0.5]", "hmt.probabilities must be 3 non-negative numbers summing to 1"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1] must be < 1"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
])
def test_bad_config_values_are_refused_at_load_before_any_model(tmp_path, capsys, monkeypatch, override, option):
    import dr_train.trainer

    def no_training(cfg):
        raise AssertionError("the trainer ran (and would load the model) with an invalid config")

    monkeypatch.setattr(dr_train.trainer, "train", no_training)
    out = tmp_path / "runs"
    assert cli.main(["--output-dir", str(out), "--set", override]) == 2
    assert option in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_bad_value_in_a_config_file_is_refused_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: {temperature: -0.5}\n")
    with pytest.raises(ValueError, match=r"loss.temperature must be > 0, got -0.5"):
        load_config(path)


def test_resume_from_flag_sets_the_option():
    args = cli.build_parser().parse_args(["--resume-from", "step-40", "--relations", "hugging"])
    assert cli.config_from_args(args).train.resume_from == "step-40"
    assert cli.config_from_args(cli.build_parser().parse_args([])).train.resume_from == ""


# ------------------------------------------------------------------------------------------ 8: every entry point

@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--set", "loss.temperature=0"], "loss.temperature must be > 0"),
    ("generate.py", ["--prompt", "x", "--lora", "{tmp}/none"], "{tmp}/none does not exist"),
    ("export.py", ["{tmp}/run/hugging"], "relation folder {tmp}/run/hugging does not exist"),
    ("evaluate.py", ["{tmp}/run"], "training run folder {tmp}/run does not exist"),
    ("prepare.py", ["ingest", "{tmp}/videos", "--out", "{tmp}/ds"], "video folder {tmp}/videos does not exist"),
    ("ablate.py", ["--relations", "hugging", "--out", "{tmp}/abl", "--train-seeds", "0,x"], "--train-seeds"),
    ("ray_submit.py", ["--set", "lora.rank=0"], "lora.rank must be >= 1"),
    ("demo.py", ["--set", "lora.alpha=nan"], "lora.alpha must be a finite number"),
])
def test_every_entry_point_reports_a_user_error_in_one_line_with_exit_2(tmp_path, capsys, monkeypatch, script,
                                                                        args, message):
    """Each launch script run as `python launch/<script>` would run it (runpy, in this process)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script] + [a.replace("{tmp}", str(tmp_path)) for a in args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "launch" / script), run_name="__main__")
    assert done.value.code == 2
    assert message.replace("{tmp}", str(tmp_path)) in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []                  # nothing written


def test_a_non_finite_loss_ends_the_train_cli_with_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    import dr_train.trainer

    def diverges(cfg):
        raise NonFiniteLossError("relation pushing, step 6: loss is nan (rec nan, rcl None) on videos "
                                 "['pushing__pushing_0']; weights were not updated.\nLast checkpoint: step-00000004")

    monkeypatch.setattr(dr_train.trainer, "train", diverges)
    assert cli.main(["--output-dir", str(tmp_path / "runs"), "--relations", "pushing"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "pushing, step 6: loss is nan" in line and "Last checkpoint: step-00000004" in line


# ------------------------------------------------------------------------------------------ 11: the VLM key

KEY = "sk-echo-DO-NOT-LEAK-31c8e2d0"


class _Echo(BaseHTTPRequestHandler):
    """Answers every request by echoing its Authorization header (raw, URL-quoted, base64) in the reply; with
    server.fail set, as a 401 whose reason phrase and body (the key straddling the client's 300-character cut)
    echo it too."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        auth = self.headers.get("Authorization", "")
        echo = (f"You sent {auth!r}, quoted {urllib.parse.quote(auth)}, "
                f"as base64 {base64.b64encode(KEY.encode()).decode()}")
        if self.server.fail:
            body = json.dumps({"error": "x" * 270 + auth}).encode()
            self.send_response(401, f"Unauthorized {auth}")
        else:
            body = json.dumps({"choices": [{"message": {"content": echo}}]}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_server(monkeypatch):
    with local_vlm_server(monkeypatch, _Echo, KEY) as (httpd, base_url):
        httpd.fail = False
        yield httpd, base_url


def _leaks(text: str) -> bool:
    """The key, or any 8-character piece of it, or its base64, is in `text`."""
    pieces = [KEY[i:i + 8] for i in range(len(KEY) - 7)] + [base64.b64encode(KEY.encode()).decode()]
    return any(p in text for p in pieces)


def test_an_echoing_vlm_server_cannot_put_the_key_in_records_or_logs(echo_server, caplog):
    httpd, url = echo_server
    client = VLMClient(url, "qwen-vl-max", timeout=5.0, max_attempts=1, sleep=lambda s: None)
    frames = np.random.default_rng(0).integers(0, 255, (9, 16, 16, 3), dtype=np.uint8)
    with caplog.at_level(logging.DEBUG):
        record = relation_accuracy(client, frames, "handshaking", repeats=2)
    written = json.dumps(record)                      # what evaluate writes into eval/videos.jsonl
    assert record["other"] == 2 and "***" in record["answers"][0] and "You sent" in record["answers"][0]
    assert not _leaks(written) and not _leaks(caplog.text)
    assert "You sent" in caplog.text                                    # the answers were logged, redacted


def test_a_failing_vlm_server_ends_the_command_with_one_redacted_line(echo_server, capsys, caplog):
    httpd, url = echo_server
    httpd.fail = True
    client = VLMClient(url, "qwen-vl-max", timeout=5.0, max_attempts=1, sleep=lambda s: None)

    def evaluate(argv):
        client.ask(["data:image/png;base64,AAAA"], "Is it?")
        return 0

    assert cli.one_line_errors(evaluate)([]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "HTTP 401" in line and "***" in line and not _leaks(line) and not _leaks(caplog.text)
    with pytest.raises(VLMError):
        evaluate([])


# ------------------------------------------------------------------------------------------ 9: --relations all

def test_relations_all_names_the_folders_it_ignores(tmp_path, caplog):
    catalog = load_catalog()
    for folder in ("handshaking", "Hugging", "misc"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "clip1.mp4").write_bytes(b"")
    names = [r.name for r in select_relations("all", catalog)]
    with caplog.at_level(logging.WARNING, logger="dr_train"):
        jobs = discover_videos([tmp_path], catalog, "folders", names)
    assert [j.relation for j in jobs] == ["handshaking"]                  # the catalog relation is kept
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "ignoring 2 folder(s)" in warning[0] and "Hugging, misc" in warning[0]
    with pytest.raises(ValueError, match="'Hugging' is not a relation of the catalog"):
        discover_videos([tmp_path], catalog, "folders", None)            # without --relations: refused
