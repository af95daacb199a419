"""Saving never loses or mixes data (issues 14 and 24): a re-save in another layout leaves exactly the new weights, a
save killed at any moment (a real SIGKILL, in a subprocess) leaves a folder that loads one whole checkpoint or is
refused, and the next save leaves no orphan files; folders that cannot be renamed, folder attributes, another model's
tokenizer, Hub pushes, and loads that run while another process saves."""

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModel, AutoProcessor, modeling_utils, pipeline
from transformers.dynamic_module_utils import get_relative_import_files

from modeling_transfusion import (
    TransfusionConfig,
    TransfusionForConditionalGeneration,
    TransfusionProcessor,
    modeling_transfusion,
    saving_transfusion,
)
from modeling_transfusion.processing import processing_transfusion
from modeling_transfusion.recipes import cli

from conftest import build_tiny_tokenizer

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


SAVE_ID = re.compile(rb'("save_id": ?")[0-9a-f]{32}"')


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes (the save id, new at each save, masked)."""
    return {
        str(path.relative_to(folder)): SAVE_ID.sub(rb'\1<save id>"', path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


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
import ctypes, errno, os, signal, sys
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

if stage.startswith("no rename: "):  # as on overlayfs, where a folder of a lower layer cannot be renamed
    def refuse(*args):
        ctypes.set_errno(errno.EXDEV)
        return -1
    saving._renameat2 = refuse
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
if stage in ("writing the weights", "no rename: writing the weights"):  # after the first of six shards
    transformers.modeling_utils.safe_save_file = then_kill(transformers.modeling_utils.safe_save_file)
elif stage == "carrying over the old files":
    saving.shutil.copytree = kill
elif stage == "before the swap":
    saving._swap = kill
elif stage == "after the swap":
    saving._swap = then_kill(saving._swap)
elif stage == "deleting the old checkpoint":
    saving.shutil.rmtree = delete_some_then_kill
elif stage == "no rename: moving the files in":  # after the first shard
    def move_then_kill(source, target):
        move(source, target)
        if target.name.startswith("model-"):
            kill()
    move = saving._move
    saving._move = move_then_kill
elif stage == "processor":  # after the tokenizer, before processor_config.json
    type(processor.tokenizer).save_pretrained = then_kill(type(processor.tokenizer).save_pretrained)
if stage == "processor":
    processor.save_pretrained(directory)
else:
    model.save_pretrained(directory, max_shard_size="1MB")
"""
# stage -> which checkpoint the folder holds after the kill ("mixed": files of both, which a load refuses)
STAGES = {
    "writing the weights": "old",
    "carrying over the old files": "old",
    "before the swap": "old",
    "after the swap": "new",
    "deleting the old checkpoint": "new",
    "processor": "old",
    "no rename: writing the weights": "old",
    "no rename: moving the files in": "mixed",
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
    elif STAGES[stage] == "new":
        new = snapshot(expected)
        assert {name: found[name] for name in new} == new, "bit for bit the new save"
        assert sorted(set(found) - set(new)) == sorted(set(old) - {"model.safetensors"} - set(new)), "nothing stale"
    if STAGES[stage] == "mixed":
        assert found["model-00001-of-00006.safetensors"] == snapshot(expected)["model-00001-of-00006.safetensors"]
        assert found["config.json"] == old["config.json"] and found["model.safetensors"] == old["model.safetensors"]
        with pytest.raises(ValueError, match=r"holds the files of 2 different saves .* a save into it was interrupted"):
            AutoModel.from_pretrained(directory)
    else:
        reference = AutoModel.from_pretrained(BUNDLED if STAGES[stage] == "old" else expected)
        assert_same_weights(AutoModel.from_pretrained(directory), weights(reference))

    model = AutoModel.from_pretrained(expected if STAGES[stage] == "mixed" else directory)
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


# Issue 24: file systems without a rename swap, folders the user cannot rename, folder attributes, another model's
# tokenizer, Hub pushes, and loads that run while another process saves.


def refuse_renaming(monkeypatch, folder: Path, code: int, system_call: str) -> None:
    """Makes the kernel refuse to rename `folder` with `code`, as overlayfs does (EXDEV) for a folder of a lower layer:
    through `renameat2` (Linux) or, where that is missing, `rename`."""
    if system_call == "renameat2":

        def renameat2(old_dir, old, new_dir, new, flags):
            ctypes.set_errno(code)
            return -1

        monkeypatch.setattr(saving_transfusion, "_renameat2", renameat2)
        return
    monkeypatch.setattr(saving_transfusion, "_renameat2", None)
    rename = os.rename

    def refusing_rename(source, target, *args, **kwargs):
        if Path(source) == folder:
            raise OSError(code, os.strerror(code), str(source), None, str(target))
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", refusing_rename)


@pytest.mark.parametrize(
    ("code", "system_call"),
    [(errno.EXDEV, "renameat2"), (errno.EPERM, "renameat2"), (errno.EBUSY, "renameat2"), (errno.EXDEV, "rename")],
    ids=["EXDEV-overlayfs", "EPERM", "EBUSY", "EXDEV-without-renameat2"],
)
def test_a_folder_that_cannot_be_renamed_gets_the_new_files_moved_in(tmp_path, monkeypatch, code, system_call):
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    before = snapshot(directory)
    inode = directory.stat().st_ino
    refuse_renaming(monkeypatch, directory, code, system_call)
    model.save_pretrained(directory, max_shard_size="1MB")

    assert directory.stat().st_ino == inode, "the folder itself stays"
    names = sorted(os.listdir(directory))
    shards = [name for name in names if SHARD.fullmatch(name)]
    assert names == sorted({*shards, "model.safetensors.index.json", *SAVED_NAMES} - {"model.safetensors"})
    carried = {name: content for name, content in before.items() if name not in MODEL_FILES}
    assert {name: snapshot(directory)[name] for name in carried} == carried, "processor, examples, trainer state kept"
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))
    assert os.listdir(tmp_path) == ["transfusion-mnist"], "no temporary folder is left"


def test_a_writable_folder_in_a_parent_the_user_cannot_write_to(tmp_path, monkeypatch):
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.model_max_length = 77
    before = snapshot(directory)
    tmp_path.chmod(0o555)
    mkdir = os.mkdir

    def mkdir_as_the_kernel_does(path, *args, **kwargs):  # for a user without write permission (root bypasses it)
        if Path(path).parent == tmp_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir_as_the_kernel_does)
    try:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    finally:
        tmp_path.chmod(0o755)
    assert sorted(os.listdir(directory)) == SAVED_WITH_PROCESSOR and os.listdir(tmp_path) == ["transfusion-mnist"]
    carried = {name: content for name, content in before.items() if name not in (*MODEL_FILES, *PROCESSOR_FILES)}
    assert {name: snapshot(directory)[name] for name in carried} == carried, "examples, trainer state kept"
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))
    assert AutoProcessor.from_pretrained(directory).tokenizer.model_max_length == 77


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as Linux stores it in `system.posix_acl_*`: version 2, then (tag, permissions, id) per entry."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


NO_ID = 0xFFFFFFFF
# owner rwx, user 4444 r-x, owning group rwx, mask rwx, others nothing
TEAM_ACL = posix_acl((0x01, 7, NO_ID), (0x02, 5, 4444), (0x04, 7, NO_ID), (0x10, 7, NO_ID), (0x20, 0, NO_ID))


def folder_attributes(folder: Path) -> dict:
    status = folder.stat()
    attributes = {name: os.getxattr(folder, name) for name in sorted(os.listxattr(folder))}
    return {"owner": status.st_uid, "group": status.st_gid, "mode": oct(stat.S_IMODE(status.st_mode)), **attributes}


@pytest.mark.parametrize("owner", ["saving user", "another user"])
def test_a_resave_keeps_the_folder_owner_group_mode_and_extended_attributes(tmp_path, monkeypatch, owner):
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    uid, gid = (4242, 4343) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(directory, uid, gid)
    os.setxattr(directory, "user.team", b"vision")
    os.setxattr(directory, "system.posix_acl_access", TEAM_ACL)
    os.setxattr(directory, "system.posix_acl_default", TEAM_ACL)
    directory.chmod(0o2770)  # setgid: new files take the folder's group
    expected = folder_attributes(directory)
    assert expected["user.team"] == b"vision" and "system.posix_acl_default" in expected
    if owner == "another user":  # the saving user cannot give a new folder this owner

        def chown(path, *args, **kwargs):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))

        monkeypatch.setattr(os, "chown", chown)
    model.save_pretrained(directory, max_shard_size="1MB")

    assert folder_attributes(directory) == expected
    config = directory / "config.json"
    assert config.stat().st_gid == gid and "system.posix_acl_access" in os.listxattr(config), "inherited as in place"
    assert_same_weights(AutoModel.from_pretrained(directory), weights(model))
    assert os.listdir(tmp_path) == ["transfusion-mnist"]


def test_a_processor_save_never_overwrites_another_models_tokenizer(tmp_path, tokenizer, tiny_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(other)
    build_tiny_tokenizer(with_image_tokens=False).save_pretrained(other)  # the LLM's own tokenizer.json
    before = snapshot(other)
    processor = TransfusionProcessor.from_model_config(tiny_config, tokenizer)
    with pytest.raises(
        FileExistsError, match=r"llama already holds another model \(config.json with model_type='llama'\)"
    ):
        processor.save_pretrained(other)
    assert snapshot(other) == before, "nothing was touched"


class HubStub:
    """Stands in for the Hugging Face Hub: records each repository created and each commit, with the files' bytes."""

    def __init__(self, monkeypatch):
        self.repos, self.commits = [], []
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)
        monkeypatch.setattr(ModelCard, "load", self.load_card)

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        files = {operation.path_in_repo: Path(operation.path_or_fileobj).read_bytes() for operation in operations}
        self.commits.append((repo_id, commit_message, files))

    @staticmethod
    def load_card(repo_id, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md yet")


def test_processor_and_pipeline_saves_push_to_the_hub(tmp_path, monkeypatch):
    hub = HubStub(monkeypatch)
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    processor = AutoProcessor.from_pretrained(directory)
    processor.save_pretrained(directory, push_to_hub=True, repo_id="me/transfusion-mnist")
    ((repo, message, files),) = hub.commits
    assert repo == "me/transfusion-mnist" and message == "Upload processor"
    assert files == {name: (directory / name).read_bytes() for name in PUSHED_WITH_PROCESSOR}

    hub.commits.clear()
    generator = pipeline("text-to-image", model=model, processor=processor)
    generator.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="me/t2i")
    assert hub.repos[1:] == ["me/t2i", "me/t2i"]
    assert [(repo, message, sorted(files)) for repo, message, files in hub.commits] == [
        ("me/t2i", "Upload TransfusionForConditionalGeneration", sorted({"README.md", *MODEL_FILES, *MODEL_CODE})),
        ("me/t2i", "Upload processor", PUSHED_WITH_PROCESSOR),
    ]
    pushed = {name: content for _, _, files in hub.commits for name, content in files.items()}
    assert pushed == {name: (tmp_path / "pushed" / name).read_bytes() for name in pushed}, "as kept, save id included"
    assert_same_weights(AutoModel.from_pretrained(tmp_path / "pushed"), weights(model))


PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")
MODEL_CODE = code_files(modeling_transfusion)
PUSHED_WITH_PROCESSOR = sorted({*PROCESSOR_FILES, *code_files(processing_transfusion)})


@pytest.fixture
def two_saves(tmp_path):
    """A sharded checkpoint (6 shards) and another save of it with other weights; returns (folder, other model)."""
    directory, model = changed_copy_of_the_bundled_checkpoint(tmp_path)
    model.save_pretrained(directory, max_shard_size="1MB")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    return directory, model


def test_a_folder_that_holds_the_files_of_two_saves_is_refused(two_saves, tmp_path):
    directory, other = two_saves
    other.save_pretrained(tmp_path / "other", max_shard_size="1MB")
    shutil.copy(tmp_path / "other" / "model-00002-of-00006.safetensors", directory)  # a save that stopped midway
    first, second = json.loads((directory / "config.json").read_text())["save_id"], other.config.save_id
    shards = [f"model-{number:05d}-of-00006.safetensors" for number in (1, 3, 4, 5, 6)]
    message = (
        rf"^{directory} holds the files of 2 different saves \(save {first}: config.json, {', '.join(shards)}; save "
        rf"{second}: model-00002-of-00006.safetensors\): a save into it was interrupted, or another process is saving "
        r"into it. Load it again once that save has finished, or save the checkpoint again.$"
    )
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(directory)


@pytest.mark.parametrize("shapes", ["same shapes", "other shapes"])
def test_a_load_while_another_process_saves_gets_one_whole_save_or_a_clear_error(two_saves, monkeypatch, shapes):
    directory, other = two_saves
    if shapes == "other shapes":
        other.resize_token_embeddings(other.config.text_config.vocab_size + 64)
    opened = []

    def safe_open_then_save(path, *args, **kwargs):
        """Opens a weights file; after the third, another save replaces the folder, as another process would."""
        handle = real_safe_open(path, *args, **kwargs)
        opened.append(Path(path).name)
        if len(opened) == 3:
            other.save_pretrained(directory, max_shard_size="1MB")
        return handle

    real_safe_open = modeling_utils.safe_open
    monkeypatch.setattr(modeling_utils, "safe_open", safe_open_then_save)
    loaded = TransfusionForConditionalGeneration.from_pretrained(directory)
    assert len(opened) > 6, "the save ran during the load, which read the folder again"
    assert_same_weights(loaded, weights(other))
    assert loaded.config.save_id == other.config.save_id

    # AutoModel reads the config before it calls from_pretrained: a save during the load is refused, naming the cause.
    first = other.config.save_id
    opened.clear()
    with pytest.raises(ValueError) as refused:
        AutoModel.from_pretrained(directory)
    assert len(opened) == 6
    assert str(refused.value) == (
        f"{directory} was saved again after its config was read (the config is of save {first}, its files now of "
        f"save {other.config.save_id}): another process saved into it during the load. Load it again."
    )


def test_weights_truncated_while_they_are_mapped_are_reported_as_truncated(two_saves, monkeypatch):
    directory, _ = two_saves
    shard = directory / "model-00004-of-00006.safetensors"
    (header_length,) = struct.unpack("<Q", shard.read_bytes()[:8])
    kept = 8 + header_length + 16  # the header and the first bytes of the tensors

    def truncate_then_map(path, *args, **kwargs):
        if Path(path) == shard and shard.stat().st_size > kept:  # a file cut short after its header was read
            os.truncate(shard, kept)
        return real_from_file(path, *args, **kwargs)

    real_from_file = torch.UntypedStorage.from_file
    monkeypatch.setattr(torch.UntypedStorage, "from_file", truncate_then_map)
    message = (
        rf"^The safetensors weights of {directory} are truncated or corrupt \(file <{shard}> size <{kept}> is smaller "
        r"than the required mapping size <\d+>\); save or copy the checkpoint again.$"
    )
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(directory)


def test_the_saving_module_names_the_model_type_of_the_config():
    # Written out in saving_transfusion.py, which processing/ holds as a link and which cannot import the config there.
    assert saving_transfusion.MODEL_TYPE == TransfusionConfig.model_type
