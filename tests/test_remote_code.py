"""No code from any directory megatie reads: a planted module next to a config that names it (``auto_map``) is
refused in one line by every entry point that loads a model or a tokenizer - with "y" waiting on stdin, the
module never runs and never reaches transformers' module cache - and a compact export may only name a
class megatie trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_export import ARGS, ROOT, exports, megatie, one_line_error, run  # noqa: F401 (fixtures)

PLANTED = "import pathlib, os\npathlib.Path(os.environ['PLANTED_MARKER']).write_text('ran')\n"


def plant(directory, descriptor: str = "config.json") -> None:
    """``planted.py`` and a descriptor that asks transformers to import it."""
    os.makedirs(directory, exist_ok=True)
    (directory / "planted.py").write_text(PLANTED, encoding="utf-8")
    path = directory / descriptor
    value = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"model_type": "planted"}
    value["auto_map"] = {"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedModel",
                         "AutoTokenizer": ["planted.PlantedTokenizer", None]}
    path.write_text(json.dumps(value), encoding="utf-8")


def command(args, tmp_path) -> subprocess.CompletedProcess:
    """A megatie command in its own process, "y" on stdin, transformers' module cache in ``tmp_path``."""
    env = dict(os.environ, PLANTED_MARKER=str(tmp_path / "marker"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *[str(a) for a in args]], input="y\ny\n", capture_output=True,
                          text=True, env=env, timeout=300)


def nothing_ran(tmp_path) -> None:
    assert not (tmp_path / "marker").exists()
    modules = tmp_path / "modules"
    assert not modules.exists() or not any(p.name.startswith("planted") for p in modules.rglob("*"))


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    path = tmp_path_factory.mktemp("labeled") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} of text", "label": i % 2}) + "\n" for i in range(40)))
    return path


@pytest.mark.parametrize("verb", ["generate", "eval", "finetune"])
def test_a_planted_hf_directory_is_refused_by_every_command(tmp_path, exports, labeled, verb):  # noqa: F811
    hf = tmp_path / "hf"
    shutil.copytree(exports[0], hf)
    plant(hf)
    tail = {"generate": ["--prompt", "The"], "eval": ["--file", labeled],
            "finetune": [tmp_path / "tuned", "--train-file", labeled, "--epochs", "1"]}[verb]
    r = command(["-m", "megatie", verb, hf, *tail], tmp_path)
    one_line_error(r, "auto_map")
    nothing_ran(tmp_path)
    assert not (tmp_path / "tuned").exists()


def test_a_planted_compact_export_and_tokenizer_are_refused(tmp_path, exports):  # noqa: F811
    compact = tmp_path / "compact"
    shutil.copytree(exports[1], compact)
    plant(compact, "tokenizer_config.json")
    r = command(["-m", "megatie", "generate", compact, "--prompt", "The"], tmp_path)
    one_line_error(r, "tokenizer_config.json asks to run Python code")
    nothing_ran(tmp_path)


def test_a_compact_export_names_only_classes_megatie_trains(tmp_path, exports):  # noqa: F811
    """``architectures`` is read from a file: a transformers class megatie does not train is refused by
    name before anything is built (the old loader built whatever the file named)."""
    compact = tmp_path / "compact"
    shutil.copytree(exports[1], compact)
    config = json.loads((compact / "config.json").read_text())
    config["architectures"] = ["GPT2DoubleHeadsModel"]
    (compact / "config.json").write_text(json.dumps(config))
    one_line_error(megatie("generate", compact, "--prompt", "The"), "'GPT2DoubleHeadsModel' is not one megatie trains")


def test_export_refuses_a_run_whose_tokenizer_is_planted(tmp_path, run):  # noqa: F811
    planted_run = tmp_path / "run"
    shutil.copytree(run, planted_run)
    tokenizer = planted_run / "tokenizer"
    for name in os.listdir(tokenizer):  # the run's SentencePiece model would be read instead
        if name.endswith(".model"):
            os.remove(tokenizer / name)
    plant(tokenizer, "tokenizer_config.json")
    r = command(["-m", "megatie", "export", planted_run, tmp_path / "out"], tmp_path)
    one_line_error(r, "auto_map")
    nothing_ran(tmp_path)


def test_the_launcher_refuses_a_planted_tokenizer(tmp_path):
    tokenizer = tmp_path / "tok"
    plant(tokenizer, "tokenizer_config.json")
    (tokenizer / "tokenizer.json").write_text("{}")
    r = command([os.path.join(ROOT, "launchers", "train_gpt2.py"), *ARGS, "--tokenizer", tokenizer,
                 "--out-dir", tmp_path / "out", "--cache-dir", tmp_path / "cache"], tmp_path)
    one_line_error(r, "auto_map")
    nothing_ran(tmp_path)


def test_refusal_reads_descriptors_safely(tmp_path):
    from megatie.errors import ConfigError
    from megatie.runtime.trusted_dirs import refuse_remote_code

    (tmp_path / "config.json").write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="not readable JSON"):
        refuse_remote_code(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an object"):
        refuse_remote_code(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    refuse_remote_code(str(tmp_path))  # an ordinary directory passes
