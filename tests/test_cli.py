"""The command line: fast start-up, parse-time checks (exit 2, one line, no traceback, nothing loaded), help.

Each error case runs in a fresh interpreter (this one has torch imported already) and reports whether
torch or transformers got imported, so "before loading anything" is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

PROBE = """
import json, sys
from kvkernels.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
print(json.dumps({"status": status, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def _run_cli(*argv: str, timeout: float = 60) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=timeout,
                         env=ENV, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


BAD_VALUES = [
    (["demo", "--keep", "1.5"], "argument --keep: must be a number in [0, 1]"),
    (["demo", "--keep", "-0.1"], "argument --keep: must be a number in [0, 1]"),
    (["demo", "--keep", "nan"], "argument --keep: must be a number in [0, 1]"),
    (["demo", "--people", "0"], "argument --people: must be an int in [1, 800], got 0"),
    (["demo", "--people", "x"], "argument --people: must be an int, got 'x'"),
    (["demo", "--questions", "0"], "argument --questions: must be an int >= 1"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an int >= 1"),
    (["demo", "--chunk-size", "-5"], "argument --chunk-size: must be an int >= 1"),
    (["demo", "--kivi-bits", "3"], "argument --kivi-bits: invalid choice"),
    (["demo", "--kivi-residual", "40"], "argument --kivi-residual: must be a multiple of kivi_group_size = 32"),
    (["demo", "--kivi-residual", "0"], "argument --kivi-residual: must be an int >= 32"),
    (["demo", "--threads", "0"], "argument --threads: must be an int >= 1"),
    (["demo", "--device", "tpu"], "argument --device: must be cpu, cuda or cuda:N"),
    (["eval", "--ratios", "0.3", "2"], "argument --ratios: must be a number in [0, 1]"),
    (["eval", "--methods", "magic"], "argument --methods: invalid choice: 'magic'"),
    (["eval", "--tasks", "poetry"], "argument --tasks: invalid choice: 'poetry'"),
    (["eval", "--questions", "21"], "argument --questions: must be an int in [1, 20]"),
    (["eval", "--contexts", "0"], "argument --contexts: must be an int >= 1"),
    (["eval", "--context-tokens", "10"], "argument --context-tokens: must be an int >= 64"),
    (["eval", "--name", "a/b"], "argument --name: must be a file name without a folder"),
    (["eval", "--out", "setup.py"], "argument --out: must be a folder, but 'setup.py' is a file"),
    (["eval", "--threads", "-1"], "argument --threads: must be an int >= 1"),
]


@pytest.mark.parametrize("argv,message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_exit_2_in_one_line_before_loading_anything(argv, message):
    result, err = _run_cli(*argv)
    assert result == {"status": 2, "torch": False, "transformers": False}, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"kvkernels {argv[0]}: error: ") and message in lines[-1], err
    assert lines[0].startswith(f"usage: kvkernels {argv[0]}")


@pytest.mark.parametrize("command", ["demo", "eval"])
def test_unknown_flag_after_a_subcommand_shows_that_subcommands_usage(command):
    result, err = _run_cli(command, "--no-such-flag", "7")
    assert result["status"] == 2 and not result["torch"]
    assert err.startswith(f"usage: kvkernels {command} ")
    assert err.strip().splitlines()[-1] == f"kvkernels {command}: error: unrecognized arguments: --no-such-flag 7"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_parse_error():
    result, err = _run_cli("demo", "--device", "cuda")
    assert result["status"] == 2 and not result["transformers"] and "Traceback" not in err
    assert "argument --device: cuda: this machine has 0 CUDA device(s); use cpu" in err


def test_help_is_fast_and_imports_neither_torch_nor_transformers():
    result, _ = _run_cli("demo", "--help")
    assert result == {"status": 0, "torch": False, "transformers": False}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kvkernels", "--help"], capture_output=True, text=True, timeout=60,
                         env=ENV, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0 and "demo" in out.stdout and "eval" in out.stdout
    # About 0.1-0.6 s here (shared 2-core machine); the bound is generous so a busy CI box does not flake,
    # while importing torch (3-12 s here) would still fail it together with the import check above.
    assert elapsed < 5.0, f"kvkernels --help took {elapsed:.1f} s"


def test_every_option_has_help_and_shows_its_default():
    from kvkernels import cli

    parser = cli.build_parser()
    for name in ("demo", "eval"):
        sub = cli._subparser(parser, name)
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"kvkernels {name} {action.option_strings} has no help line"
            if action.default is not None and not isinstance(action.default, bool):
                assert "(default:" in sub.formatter_class(prog="x")._get_help_string(action), action.dest
        assert "(default:" in text


def test_eval_default_out_is_a_fresh_folder_outside_committed_results():
    from kvkernels import cli

    args = cli.build_parser().parse_args(["eval"])
    assert args.out.name.startswith("kvkernels-eval-") and not args.out.exists()
    assert "bench" not in args.out.parts


def test_eval_method_list_matches_the_harness():
    pytest.importorskip("transformers")
    from kvkernels.eval import cli as eval_cli
    from kvkernels.eval import harness

    assert set(eval_cli.METHODS) == set(harness.ALL_METHODS)
    assert set(eval_cli.DEFAULT_METHODS) <= set(eval_cli.METHODS)


def test_kivi_group_sizes_match_the_ops():
    from kvkernels import _args, _validate

    assert _args.KIVI_GROUP_SIZES == _validate.KIVI_GROUPS and _args.KIVI_BITS == _validate.KIVI_BITS


def test_makefile_keeps_an_installed_torch_and_asks_for_the_cpu_build_otherwise():
    out = subprocess.run(["make", "-n", "install", "PYTHON=python-under-test"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    assert 'if python-under-test -c "import torch;' in script  # an installed torch (CUDA or not) is kept
    assert ("torch==2.13.0 --retries 1 --extra-index-url https://download.pytorch.org/whl/cpu" in script)
    assert 'pip install -q --disable-pip-version-check -e ".[test,hf]"' in script
    no_index = subprocess.run(["make", "-n", "torch", "PYTHON=p", "TORCH_INDEX="], capture_output=True, text=True,
                              cwd=ROOT, timeout=60).stdout
    assert "torch==2.13.0" in no_index and "--extra-index-url" not in no_index


def test_import_kvkernels_is_lazy_without_torch_and_registers_the_ops_on_first_use():
    code = ("import sys, kvkernels\n"
            "assert 'torch' not in sys.modules\n"
            "kvkernels.ragged_attention\n"
            "import torch\n"
            "assert all(hasattr(torch.ops.kvkernels, n) for n in ('topk_mask', 'ragged_attention', 'compact_kv'))\n"
            "assert 'triton' not in sys.modules and 'cupy' not in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
