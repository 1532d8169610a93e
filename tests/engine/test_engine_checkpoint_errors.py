"""A file that is not a checkpoint, given wherever a checkpoint is read (eval, route, resume, the
analyses all read through engine/checkpoint.py): the message names the file, says what it is and
what a checkpoint is, and shows no Python exception names."""
import pickle
import re

import pytest
import torch

from ride_fast.cli import main
from ride_fast.engine import CheckpointError, load_checkpoint
from ride_fast.engine.checkpoint import load_routed_checkpoint

WHAT_A_CHECKPOINT_IS = "A ride_fast checkpoint is a file written by `ride-fast train`, `ride-fast route` or `ride-fast convert`"
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")


def _text(path):
    path.write_text("epoch,loss\n1,0.5\n")


def _random(path):
    path.write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())


def _objects(path):
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "config": pickle.PickleError}, fh)  # a class: not plain data


def _foreign_dict(path):
    torch.save({"weights": torch.ones(2), "step": 3}, path)


def _tensor(path):
    torch.save(torch.ones(2, 3), path)


def _original(path):
    torch.save({"state_dict": {"conv1.weight": torch.ones(1)}, "epoch": 200}, path)


def _empty(path):
    path.write_bytes(b"")


CASES = {
    "text": (_text, "it is a text file, not a torch.save file"),
    "random bytes": (_random, "it is not a torch.save file (neither a zip archive nor a pickle)"),
    "pickled objects": (_objects, "it is a pickle holding Python objects besides tensors and plain containers"),
    "torch dict": (_foreign_dict, "it holds a dict with the keys ['weights', 'step'] but no 'model'"),
    "tensor": (_tensor, "it holds a single tensor of shape [2, 3]"),
    "original": (_original, "it holds a dict with the keys ['state_dict', 'epoch'] but no 'model', like a checkpoint of the "
                           "original RIDE code: `ride-fast convert SRC DST --model NAME`"),
    "empty": (_empty, "the file is empty"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_eval_of_a_file_that_is_not_a_checkpoint_says_what_it_is_and_what_a_checkpoint_is(tmp_path, capsys, kind):
    write, what = CASES[kind]
    path = tmp_path / "model.pt"
    write(path)
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"ride-fast eval: error: {path} is not a ride_fast checkpoint: {what}" in err
    assert WHAT_A_CHECKPOINT_IS in err and "'model_args'" in err
    assert not EXCEPTION_NAME.search(err), err


def test_every_reader_gives_the_same_message(tmp_path):
    path = tmp_path / "notes.pt"
    _text(path)
    for read in (load_checkpoint, load_routed_checkpoint):
        with pytest.raises(CheckpointError, match=re.escape(f"{path} is not a ride_fast checkpoint: it is a text file")):
            read(path)


def test_a_truncated_checkpoint_is_called_damaged_not_foreign(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read the checkpoint: it is a damaged or truncated torch.save archive")
    assert not EXCEPTION_NAME.search(message)


def test_a_folder_given_as_checkpoint_is_called_a_folder_and_its_checkpoints_are_named(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert f"ride-fast eval: error: {tmp_path} is a folder, not a checkpoint file and holds no .pt file" in capsys.readouterr().err
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path} is a folder, not a checkpoint file: name one of its "
                                                        f"checkpoints, e.g. {tmp_path / 'best.pt'} (best.pt, last.pt)")):
        load_checkpoint(tmp_path)
