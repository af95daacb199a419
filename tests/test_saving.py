"""Saving never loses or mixes data (issue 14): a re-save in another layout leaves exactly the new weights, a save
killed at any moment (a real SIGKILL, in a subprocess) leaves a folder that loads one whole checkpoint, and the next
save leaves no orphan files."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_relative_import_files

from modeling_transfusion import modeling_transfusion, saving_transfusion
from modeling_transfusion.processing import processing_transfusion
from modeling_transfusion.recipes import cli

BUNDLED = cli.DEFAULT_MODEL
BUNDLED_NAMES = sorted(os.listdir(BUNDLED))


def code_files(module) -> set[str]:
    """The code a save copies next to the files of a registered class (remote code): its module and the modules it
    imports, as transformers finds them."""
    return {Path(path).name for path in (module.__file__, *get_relative_import_files(module.__file__))}


# What a model save (and a processor save) writes into the bundled checkpoint's folder.
SAVED_NAMES = sorted({*BUNDLED_NAMES, *code_files(modeling_transfusion)})
SAVED_WITH_PROCESSOR = sorted({*SAVED_NAMES, *code_files(processing_transfusion)})
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(expected)
    different = [name for name in expected if not torch.equal(loaded[name], expected[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def changed_copy_of_the_bundled_checkpoint(tmp_path):
    """What the issue's user does: a copy of the checkpoint, loaded, one weight changed."""
    directory = shutil.copytree(BUNDLED, tmp_path / "transfusion-mnist")
    model = AutoModel.from_pretrained(directory)
    with torch.no_grad():
        model.get_input_embeddings().weight[5, 0] += 1.0
    return directory, model


def test_a_sharded_resave_keeps_exactly_the_new_weights(tmp_path):
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    before = snapshot(directory)
    mode = stat.S_IMODE(directory.stat().st_mode)
    model.save_pretrained(directory, max_shard_size="1MB")

    names = sorted(os.listdir(directory))
    shards = [name for name in names if SHARD.fullmatch(name)]
    assert len(shards) == 6 and "model.safetensors" not in names, names
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert names == sorted({*shards, "model.safetensors.index.json", *SAVED_NAMES} - {"model.safetensors"})
    carried = {name: content for name, content in before.items() if name not in MODEL_FILES}
    assert {name: snapshot(directory)[name] for name in carried} == carried, "processor, examples, trainer state kept"
    assert stat.S_IMODE(directory.stat().st_mode) == mode
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))

    model.save_pretrained(directory)  # and back to one file: the shards and the index go
    assert sorted(os.listdir(directory)) == SAVED_NAMES
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))
    assert os.listdir(tmp_path) == ["transfusion-mnist"], "no temporary folder is left"


def test_a_model_and_its_processor_saved_into_one_folder_stay_consistent(tmp_path):
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.model_max_length = 77
    model.save_pretrained(directory)
    processor.save_pretrained(directory)

    fresh = tmp_path / "fresh"
    model.save_pretrained(fresh)
    processor.save_pretrained(fresh)
    saved = snapshot(directory)
    assert sorted(os.listdir(directory)) == SAVED_WITH_PROCESSOR
    assert {name: saved[name] for name in snapshot(fresh)} == snapshot(fresh), "as saved into an empty folder"
    assert saved["trainer_state.json"] == (BUNDLED / "trainer_state.json").read_bytes()
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))
    assert AutoProcessor.from_pretrained(directory).tokenizer.model_max_length == 77


# A save killed at each of its stages, by SIGKILL: nothing of the killed process runs after it (no finally, no atexit).
KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch, transformers
import modeling_transfusion as mt
from modeling_transfusion import saving_transfusion as saving

directory, expected, stage = sys.argv[1:]

def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def then_kill(function):
    def run(*args, **kwargs):
        function(*args, **kwargs)
        kill()
    return run

def delete_some_then_kill(path, *args, **kwargs):
    for file in sorted(Path(path).glob("*.json")):
        file.unlink()
    kill()

model = transformers.AutoModel.from_pretrained(directory)
processor = transformers.AutoProcessor.from_pretrained(directory)
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(1.0)
processor.tokenizer.add_tokens(["<new>"])
if stage == "processor":
    processor.save_pretrained(expected)
else:
    model.save_pretrained(expected, max_shard_size="1MB")
if stage == "writing the weights":  # after the first of six shards
    transformers.modeling_utils.safe_save_file = then_kill(transformers.modeling_utils.safe_save_file)
elif stage == "carrying over the old files":
    saving.shutil.copytree = kill
elif stage == "before the swap":
    saving._swap = kill
elif stage == "after the swap":
    saving._swap = then_kill(saving._swap)
elif stage == "deleting the old checkpoint":
    saving.shutil.rmtree = delete_some_then_kill
elif stage == "processor":  # after the tokenizer, before processor_config.json
    type(processor.tokenizer).save_pretrained = then_kill(type(processor.tokenizer).save_pretrained)
if stage == "processor":
    processor.save_pretrained(directory)
else:
    model.save_pretrained(directory, max_shard_size="1MB")
"""
# stage -> which checkpoint the folder holds after the kill
STAGES = {
    "writing the weights": "old",
    "carrying over the old files": "old",
    "before the swap": "old",
    "after the swap": "new",
    "deleting the old checkpoint": "new",
    "processor": "old",
}


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    """Runs every stage's killed save at once (one subprocess each); returns stage -> (folder, expected, returncode)."""
    root = tmp_path_factory.mktemp("killed")
    runs = {}
    for number, stage in enumerate(STAGES):
        directory = shutil.copytree(BUNDLED, root / f"stage{number}" / "checkpoint")
        expected = root / f"expected{number}"
        command = [sys.executable, "-c", KILLED_SAVE, str(directory), str(expected), stage]
        runs[stage] = directory, expected, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = {}
    for stage, (directory, expected, process) in runs.items():
        _, stderr = process.communicate(timeout=600)
        results[stage] = directory, expected, process.returncode, stderr.decode(errors="replace")[-2000:]
    return results


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_save_killed_at_any_stage_leaves_one_whole_checkpoint(killed_saves, stage):
    directory, expected, returncode, stderr = killed_saves[stage]
    assert returncode == -signal.SIGKILL, f"the save was not killed at this stage:\n{stderr}"
    leftovers = [name for name in os.listdir(directory.parent) if name != "checkpoint"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.transfusion-save-"), leftovers

    old = snapshot(BUNDLED)
    found = snapshot(directory)
    if STAGES[stage] == "old":
        assert found == old, "bit for bit the old checkpoint: config, weights, processor, examples"
    else:
        new = snapshot(expected)
        assert {name: found[name] for name in new} == new, "bit for bit the new save"
        assert sorted(set(found) - set(new)) == sorted(set(old) - {"model.safetensors"} - set(new)), "nothing stale"
    reference = AutoModel.from_pretrained(BUNDLED if STAGES[stage] == "old" else expected)
    assert_same_weights(AutoModel.from_pretrained(directory), weights(reference))

    model = AutoModel.from_pretrained(directory)
    model.save_pretrained(directory)  # the next save cleans up after the killed one
    assert os.listdir(directory.parent) == ["checkpoint"], "no orphan folder"
    assert sorted(os.listdir(directory)) == SAVED_NAMES, "no orphan file"
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))


def test_without_an_atomic_swap_the_next_save_restores_a_checkpoint_left_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(saving_transfusion, "_exchange", lambda first, second: False)  # as on macOS or Windows
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    model.save_pretrained(directory, max_shard_size="1MB")
    assert "model.safetensors" not in os.listdir(directory)
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))

    # A save killed between its two renames leaves the checkpoint renamed aside and nothing at its name.
    directory.rename(tmp_path / ".transfusion-mnist.transfusion-old-0123abcd")
    model.save_pretrained(directory)
    assert os.listdir(tmp_path) == ["transfusion-mnist"]
    assert sorted(os.listdir(directory)) == SAVED_NAMES, "the examples and trainer state were put back and kept"
    carried = {name: content for name, content in snapshot(BUNDLED).items() if name not in MODEL_FILES}
    assert {name: snapshot(directory)[name] for name in carried} == carried
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))
