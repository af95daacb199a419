"""A checkpoint folder holds one whole save: `save_pretrained` of the model and the processor replaces it in one step,
and `from_pretrained` of the model reads the files of one save from it.

Saving. The new files are written into a temporary folder (`.NAME.transfusion-save-*`). A model save writes one save id
into `config.json` (`save_id`) and into the safetensors metadata of every weights file. When the folder holds a
checkpoint (or nothing), the temporary folder is made beside it with its owner, group, mode and extended attributes
(POSIX ACLs too), before any file is written in it; the old files that the new save does not replace (the processor's
files for a model save, `examples/`, `trainer_state.json`, your own files) are hard-linked (or copied) into it, never
the old weight files or index of another layout, and the two folders are then swapped in one system call (Linux
`renameat2(RENAME_EXCHANGE)`) before the old one is deleted. A save killed at any moment leaves either the old
checkpoint or the new one, whole; the next save deletes what a killed one left behind.

Where the swap is unavailable (other systems, some network file systems), the folder is renamed aside
(`.NAME.transfusion-old-*`) and the new one renamed into place: a save killed between the two renames leaves no folder
at NAME, and the next save into it puts the old checkpoint back first.

Where the folder cannot be renamed at all (a folder of a lower overlayfs layer, EXDEV; EPERM, EBUSY, EACCES), where its
parent is not writable, where its owner or group cannot be given to a new folder (another user's folder), and for a
folder that holds files but no checkpoint or is a mount point, the folder itself stays: the new save is written whole
into a temporary folder (inside it when the parent is not writable), then its files are moved in one by one, each in
one rename: the weights first, then the old files of the families it replaces are deleted, the config files last. The
old checkpoint is untouched until the new one is complete; a save killed while moving leaves files of two saves, which
a model load refuses (their save ids differ) until the next save replaces them.

Loading. `load_one_save` reads the save ids of `config.json` and of the weights before and after `from_pretrained`:
files of two saves, or a folder that changes during the load (another process saving into it), make it load again, and
it refuses with an error naming the files and the cause when they stay mixed.
"""

import ctypes
import errno
import inspect
import json
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from transformers.utils import logging

# `TransfusionConfig.model_type` (tests/test_saving.py checks it), written out: processing/ holds this module as a
# link, where the package's other modules cannot be imported relatively.
MODEL_TYPE = "transfusion"

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
WEIGHTS_FILE = re.compile(r"model(\.[\w-]+)?(-\d+-of-\d+)?\.safetensors")
SAVE_ID = "save_id"
# Moved in last, after the old layout's files are deleted: without them, a half-moved folder is not a checkpoint.
CONFIG_FILES = ("config.json", "processor_config.json")
AT_FDCWD = -100
RENAME_EXCHANGE = 2
# The swap is not implemented here: rename the folder aside instead.
NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
# The folder cannot be renamed (overlayfs lower layer, immutable, busy, parent not writable): move the files in instead.
NOT_RENAMEABLE = (errno.EXDEV, errno.EPERM, errno.EBUSY, errno.EACCES)
LOAD_ATTEMPTS = 6
FIRST_RETRY_SECONDS = 0.05  # doubled after each attempt: about 1.5 s in all before a load is refused
COPY_BUFFER_BYTES = 1 << 24

Loaded = TypeVar("Loaded")


def _load_renameat2() -> Callable | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no glibc >= 2.28: macOS, Windows, older C libraries
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def check_save_directory(save_directory: str | os.PathLike) -> bool:
    """Refuses (`FileExistsError`) a folder whose `config.json` belongs to another model; returns whether it holds a
    Transfusion checkpoint."""
    config_file = Path(save_directory) / "config.json"
    if not config_file.is_file():
        return False
    try:
        found = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        found = "unreadable"
    if found != MODEL_TYPE:
        raise FileExistsError(
            f"{save_directory} already holds another model (config.json with model_type={found!r}); save to another "
            "directory, or remove it first."
        )
    return True


def new_save_id() -> str:
    """A fresh save id: 32 random hexadecimal digits."""
    return secrets.token_hex(16)


def save_atomically(save_directory: str | os.PathLike, save: Callable, *args, save_id: str | None = None, **kwargs):
    """Runs `save(folder, *args, **kwargs)` (a `save_pretrained`) so that `save_directory` goes from its old
    checkpoint to the new one in one step, as the module docstring describes; with `save_id`, writes it into the
    metadata of the weights files the save wrote. Returns what `save` returns."""
    options = inspect.signature(save).bind(save_directory, *args, **kwargs).arguments
    if not options.get("is_main_process", True):  # the other ranks of a distributed save write nothing themselves
        return save(save_directory, *args, **kwargs)
    directory = Path(save_directory).resolve()  # a symlinked folder: replace its target, keep the link
    if options.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = directory.name  # the default would be the temporary folder's name
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_directory {save_directory} is a file, not a folder.")
    _remove_leftovers(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging, swap = _make_staging(directory)
    try:
        result = save(str(staging), *args, **kwargs)  # a string: ProcessorMixin splits it to name a Hub repo
        written = sorted(entry.name for entry in staging.iterdir())
        if save_id is not None:
            stamp_weights(staging, save_id)
        if not directory.exists():
            os.rename(staging, directory)
        elif swap:
            _carry_over(directory, staging)
            _replace(directory, staging, written)
        else:
            _move_in(staging, directory, written)
    finally:
        if staging.exists():  # what a failed save wrote
            shutil.rmtree(staging)
    return result


def _family(name: str) -> re.Pattern | None:
    return next((family for family in CHECKPOINT_FAMILIES if family.fullmatch(name)), None)


def _sibling(parent: Path, name: str, mark: str) -> Path:
    return parent / f".{name}{mark}{secrets.token_hex(4)}"


def _make_staging(directory: Path) -> tuple[Path, bool]:
    """Creates the temporary folder the save writes into; returns it and whether it will be swapped with `directory`
    (else its files are moved in)."""
    if not directory.is_dir():
        return _make_folder(directory.parent, directory.name), True
    existing = list(directory.iterdir())
    holds_files_only = existing and not any(_family(entry.name) for entry in existing)
    if not holds_files_only and not os.path.ismount(directory):
        try:
            staging = _make_folder(directory.parent, directory.name)
        except PermissionError:  # a parent the user cannot write to: the folder cannot be renamed either
            pass
        else:
            if _copy_folder_attributes(directory, staging):
                return staging, True
            staging.rmdir()
    # Inside the folder, new files inherit its group and default ACL as they would in a save into it.
    return _make_folder(directory, directory.name), False


def _make_folder(parent: Path, name: str) -> Path:
    folder = _sibling(parent, name, SAVE_MARK)
    folder.mkdir()
    return folder


def _copy_folder_attributes(source: Path, target: Path) -> bool:
    """Gives `target` the owner, group, mode and extended attributes (POSIX ACLs included) of `source`, before anything
    is written in it, so that new files inherit its group and default ACL; False where the owner or group cannot be
    given (a folder of another user, a group the user is not in)."""
    status = source.stat()
    if hasattr(os, "chown"):
        try:
            os.chown(target, status.st_uid, status.st_gid)
        except OSError:  # EPERM; EINVAL for an id outside this user namespace
            return False
    shutil.copystat(source, target)
    return True


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


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target, follow_symlinks=False)


def _replace(directory: Path, staging: Path, written: list[str]) -> None:
    """Puts `staging` in place of `directory` and deletes the old checkpoint; a folder that cannot be renamed gets the
    files `written` by the save moved into it instead."""
    try:
        old = _swap(directory, staging)
    except OSError as error:
        if error.errno not in NOT_RENAMEABLE:
            raise
        logger.info(f"{directory} cannot be renamed ({error.strerror}): moving the new files into it one by one.")
        _move_in(staging, directory, written)
    else:
        shutil.rmtree(old)


def _swap(directory: Path, staging: Path) -> Path:
    """Puts `staging` at `directory`; returns where the old checkpoint now is."""
    working_directory = os.getcwd()
    if _exchange(directory, staging):
        old = staging
    else:
        old = _sibling(directory.parent, directory.name, OLD_MARK)
        os.rename(directory, old)
        try:
            os.rename(staging, directory)  # killed before this line: the next save renames `old` back first
        except OSError:
            os.rename(old, directory)
            raise
    if Path(working_directory).is_relative_to(directory):  # this process worked inside the old folder
        os.chdir(working_directory)
    return old


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two folders in one system call; returns False where the system or file system does not implement it,
    raises the `OSError` where it refuses to rename these folders."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _move_in(staging: Path, directory: Path, names: list[str]) -> None:
    """Moves the entries `names` of `staging` into `directory`, each in one rename; the config files last, after the
    old files of the families they replace (an earlier layout's weights, index, ...) are deleted."""
    replaced = {_family(name) for name in names} - {None}
    stale = [entry for entry in directory.iterdir() if entry.name not in names and _family(entry.name) in replaced]
    for name in names:
        if name not in CONFIG_FILES:
            _move(staging / name, directory / name)
    for entry in stale:
        _delete(entry)
    for name in names:
        if name in CONFIG_FILES:
            _move(staging / name, directory / name)


def _move(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


def _delete(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """The header of a safetensors file: its length in bytes and its JSON (the tensors' entries and `__metadata__`)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path} has no safetensors header.")
    return length, header


def stamp_weights(folder: str | os.PathLike, save_id: str) -> None:
    """Writes `save_id` into the safetensors metadata of every weights file in `folder` that does not carry it yet
    (the file is written again, tensors unchanged: transformers' `save_pretrained` takes no metadata of its own)."""
    for path in sorted(Path(folder).iterdir()):
        if not WEIGHTS_FILE.fullmatch(path.name):
            continue
        length, header = _safetensors_header(path)
        metadata = header.setdefault("__metadata__", {})
        if metadata.get(SAVE_ID) == save_id:
            continue
        metadata[SAVE_ID] = save_id
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the tensors stay 8-byte aligned, as safetensors writes them
        stamped = path.with_name(path.name + ".stamped")
        with open(path, "rb") as source, open(stamped, "wb") as target:
            source.seek(8 + length)
            target.write(struct.pack("<Q", len(encoded)) + encoded)
            shutil.copyfileobj(source, target, COPY_BUFFER_BYTES)
        os.replace(stamped, path)


def save_ids(directory: Path) -> dict[str, str | None] | None:
    """The save id of `config.json` and of each safetensors weights file in `directory` (None for a file without one);
    files that cannot be read are left out (loading reports them). None when `directory` is not a folder (any more)."""
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return None
    ids = {}
    for name in names:
        try:
            if name == "config.json":
                ids[name] = json.loads((directory / name).read_text(encoding="utf-8")).get(SAVE_ID)
            elif WEIGHTS_FILE.fullmatch(name):
                ids[name] = _safetensors_header(directory / name)[1].get("__metadata__", {}).get(SAVE_ID)
        except (OSError, ValueError, AttributeError, struct.error):
            continue
    return ids


def broken_weights(directory: Path) -> list[str]:
    """The safetensors weights files in `directory` whose header cannot be read, or whose length is not the one their
    header gives (a truncated file)."""
    broken = []
    for name in sorted(os.listdir(directory)):
        if not WEIGHTS_FILE.fullmatch(name):
            continue
        try:
            length, header = _safetensors_header(directory / name)
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            whole = (directory / name).stat().st_size == 8 + length + end
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
            whole = False
        if not whole:
            broken.append(name)
    return broken


def load_one_save(directory: Path, load: Callable[[], Loaded], config_save_id: str | None = None) -> Loaded:
    """Runs `load()` (a `from_pretrained` of the folder `directory`) so that it reads the files of one save: it loads
    again while the save ids of the folder's files differ or change during the load (another process saving into it),
    and raises a `ValueError` naming the files and the cause when they keep doing so. `config_save_id` is the save id
    of a config read from the folder before the load (as `AutoModel` does): files of another save are then refused.
    An error of a load during which nothing changed is raised as it is."""
    failure = None
    for attempt in range(LOAD_ATTEMPTS):
        if attempt:
            time.sleep(FIRST_RETRY_SECONDS * 2 ** (attempt - 1))
        before = save_ids(directory)
        if before is None or len(set(before.values())) > 1:
            continue
        if config_save_id is not None and set(before.values()) != {config_save_id}:
            raise ValueError(
                f"{directory} was saved again after its config was read (the config is of save {config_save_id}, "
                f"its files now of save {next(iter(before.values()))}): another process saved into it during the "
                "load. Load it again."
            ) from failure
        try:
            loaded = load()
        except Exception as error:
            if save_ids(directory) == before:
                raise
            failure = error
            continue
        if save_ids(directory) == before:
            return loaded
    raise ValueError(_mixed_saves_message(directory)) from failure


def _mixed_saves_message(directory: Path) -> str:
    files_by_save = {}
    for name, save_id in (save_ids(directory) or {}).items():
        files_by_save.setdefault(save_id, []).append(name)
    if len(files_by_save) > 1:
        saves = "; ".join(
            f"{f'save {save_id}' if save_id else 'no save id'}: {', '.join(names)}"
            for save_id, names in files_by_save.items()
        )
        return (
            f"{directory} holds the files of {len(files_by_save)} different saves ({saves}): a save into it was "
            "interrupted, or another process is saving into it. Load it again once that save has finished, or save "
            "the checkpoint again."
        )
    return (
        f"{directory} changed during each of {LOAD_ATTEMPTS} attempts to load it: another process keeps saving into "
        "it. Load it again once that process has finished."
    )


__all__ = [
    "save_atomically",
    "check_save_directory",
    "new_save_id",
    "stamp_weights",
    "load_one_save",
    "save_ids",
    "broken_weights",
]
