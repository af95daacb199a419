"""Saving a checkpoint folder as one step, for the `save_pretrained` of the model and the processor.

A save never mixes two checkpoints and a killed save never breaks one. The new files are written into a temporary
sibling folder (`.NAME.transfusion-save-*`). When the folder holds a checkpoint (or nothing), the old files that the new
save does not replace (the processor's files for a model save, `examples/`, `trainer_state.json`, your own files) are
hard-linked (or copied) into it, never the old weight files or index of another layout, and the two folders are then
swapped in one system call (Linux `renameat2(RENAME_EXCHANGE)`) before the old one is deleted. A save killed at any
moment leaves either the old checkpoint or the new one, whole; the next save deletes what a killed one left behind.

Where the swap is unavailable (other systems, some network file systems), the folder is renamed aside
(`.NAME.transfusion-old-*`) and the new one renamed into place: a save killed between the two renames leaves no
folder at NAME, and the next save into it puts the old checkpoint back first. A folder that holds files but no
checkpoint, or a mount point (which cannot be renamed), gets the new files moved in one by one, `config.json` last;
only there can a save killed midway leave new and old files side by side.
"""

import ctypes
import errno
import inspect
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

SAVE_MARK = ".transfusion-save-"
OLD_MARK = ".transfusion-old-"
# Files that belong together: a save that writes any file of a family replaces the whole family, so that no file of
# an earlier save's layout survives it (a single weights file next to new shards, an old index, an old variant).
CHECKPOINT_FAMILIES = (
    re.compile(r"(pytorch_)?model(\.[\w-]+)?(-\d+-of-\d+)?\.(safetensors|bin)(\.index(\.[\w-]+)?\.json)?"),
    re.compile(r"adapter_model(\.[\w-]+)?\.(safetensors|bin)"),
    re.compile(r"(generation_)?config\.json"),
    re.compile(
        r"(pre)?processor_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json"
        r"|chat_template\.(jinja|json)|additional_chat_templates|vocab\.(json|txt)|merges\.txt|tokenizer\.model"
    ),
)
# Written last when files are moved in one by one: without them, a half-moved folder is not loaded as a checkpoint.
CONFIG_FILES = ("config.json", "processor_config.json")
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def _load_renameat2() -> Callable | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no glibc >= 2.28: macOS, Windows, older C libraries
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def check_save_directory(save_directory: str | os.PathLike, model_type: str) -> None:
    """Refuses a folder whose `config.json` is not a `model_type` config (`FileExistsError`); warns that a checkpoint
    of this type will be replaced."""
    config_file = Path(save_directory) / "config.json"
    if not config_file.is_file():
        return
    try:
        found = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        found = "unreadable"
    if found != model_type:
        raise FileExistsError(
            f"{save_directory} already holds another model (config.json with model_type={found!r}); save to another "
            "directory, or remove it first."
        )
    logger.warning(
        f"Replacing the Transfusion checkpoint in {save_directory}: its config and weights are replaced, its other "
        "files are kept."
    )


def save_atomically(save_directory: str | os.PathLike, save: Callable, *args, **kwargs):
    """Runs `save(folder, *args, **kwargs)` (a `save_pretrained`) so that `save_directory` goes from its old
    checkpoint to the new one in one step, as the module docstring describes. Returns what `save` returns."""
    options = inspect.signature(save).bind(save_directory, *args, **kwargs).arguments
    if not options.get("is_main_process", True):  # the other ranks of a distributed save write nothing themselves
        return save(save_directory, *args, **kwargs)
    directory = Path(save_directory).resolve()  # a symlinked folder: replace its target, keep the link
    if options.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = directory.name  # the default would be the temporary folder's name
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_directory {save_directory} is a file, not a folder.")
    _remove_leftovers(directory)
    existing = list(directory.iterdir()) if directory.is_dir() else []
    holds_checkpoint = any(_family(entry.name) for entry in existing)
    swap = directory.is_dir() and (holds_checkpoint or not existing) and not os.path.ismount(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A folder that is not swapped stages inside itself: a mount point's own file system is elsewhere than its parent's.
    staging = _sibling(directory if directory.is_dir() and not swap else directory.parent, directory.name, SAVE_MARK)
    staging.mkdir()
    try:
        result = save(staging, *args, **kwargs)
        if not directory.exists():
            os.rename(staging, directory)
        elif swap:
            _carry_over(directory, staging)
            shutil.rmtree(_swap(directory, staging))
        else:
            _move_in(staging, directory)
    finally:
        if staging.exists():  # what a failed save wrote
            shutil.rmtree(staging)
    return result


def _family(name: str) -> re.Pattern | None:
    return next((family for family in CHECKPOINT_FAMILIES if family.fullmatch(name)), None)


def _sibling(parent: Path, name: str, mark: str) -> Path:
    return parent / f".{name}{mark}{secrets.token_hex(4)}"


def _leftovers(directory: Path) -> list[Path]:
    places = [place for place in (directory.parent, directory) if place.is_dir()]
    prefixes = (f".{directory.name}{SAVE_MARK}", f".{directory.name}{OLD_MARK}")
    return [entry for place in places for entry in place.iterdir() if entry.name.startswith(prefixes)]


def _remove_leftovers(directory: Path) -> None:
    """Deletes the folders a killed save left, after putting back a checkpoint it had renamed aside."""
    for leftover in _leftovers(directory):
        if OLD_MARK in leftover.name and not directory.exists():
            logger.warning(f"Restoring {directory} from {leftover.name}, left by a save that was killed.")
            os.rename(leftover, directory)
        else:
            shutil.rmtree(leftover)


def _carry_over(old: Path, new: Path) -> None:
    """Links into `new` the entries of `old` that the new save neither wrote nor replaced (a whole family)."""
    written = {entry.name for entry in new.iterdir()}
    replaced = {_family(name) for name in written} - {None}
    for entry in old.iterdir():
        if entry.name in written or _family(entry.name) in replaced:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)
    shutil.copymode(old, new)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target, follow_symlinks=False)


def _swap(directory: Path, staging: Path) -> Path:
    """Puts `staging` at `directory`; returns where the old checkpoint now is."""
    working_directory = os.getcwd()
    if _exchange(directory, staging):
        old = staging
    else:
        old = _sibling(directory.parent, directory.name, OLD_MARK)
        os.rename(directory, old)
        os.rename(staging, directory)  # killed before this line: the next save renames `old` back first
    if Path(working_directory).is_relative_to(directory):  # this process worked inside the old folder
        os.chdir(working_directory)
    return old


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two folders in one system call; returns False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _move_in(staging: Path, directory: Path) -> None:
    """Moves the new files into a folder that cannot be swapped, config files last; then deletes the old files of the
    families the new save replaced."""
    written = sorted(staging.iterdir(), key=lambda entry: entry.name in CONFIG_FILES)
    replaced = {_family(entry.name) for entry in written} - {None}
    for entry in written:
        target = directory / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    names = {entry.name for entry in written}
    for entry in directory.iterdir():
        if entry.name in names or _family(entry.name) not in replaced:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


__all__ = ["save_atomically", "check_save_directory"]
