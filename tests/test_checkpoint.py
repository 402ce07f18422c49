import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kill_once, run_files, saved_steps, subprocess_env

from experiments.checkpoint import CheckpointError, Checkpoints, Interrupted
from experiments.data import load_digits, subset
from experiments.models import build_budgeted, create_members
from experiments.train import (
    LoopConfig,
    OptimConfig,
    Phase,
    Saving,
    abstract_train_state,
    train,
)
from superweights import Budget

LOOP = LoopConfig(epochs=3, batch_size=32, eval_batch_size=64, seed=3)
OPTIM = OptimConfig()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return subset(load_digits(), 128, 64)  # 4 steps per epoch


def wrn10(fraction: float):
    modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    return build_budgeted(modules, Budget(fraction=fraction), jnp.zeros((1, 8, 8, 1)))


@pytest.fixture(scope="module")
def model():
    return wrn10(0.8)


def stop_after(steps: int):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= steps

    return should_stop


def leaves_equal(a, b) -> bool:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


@pytest.mark.parametrize(
    ("fraction", "stop", "position"),
    [(0.8, 6, (2, 2)), (0.05, 4, (1, 4))],  # 4 steps an epoch: mid-epoch 2, end of epoch 1
    ids=["full-size-mid-epoch", "sub-layer-last-batch"],
)
def test_an_interrupted_and_resumed_run_ends_exactly_like_an_uninterrupted_one(
    digits, fraction, stop, position, tmp_path
):
    model = wrn10(fraction)
    assert model.plan.sublayer == (fraction < 0.5)
    reference, reference_metrics = train(model, digits, LOOP, OPTIM, progress=False)

    checkpoints = Checkpoints(tmp_path / "ckpt")
    with pytest.raises(Interrupted, match=f"step {stop}"):
        train(
            model,
            digits,
            LOOP,
            OPTIM,
            progress=False,
            saving=Saving(checkpoints, should_stop=stop_after(stop)),
        )
    state, saved_at, _ = checkpoints.restore_latest(
        lambda meta: abstract_train_state(model, digits, LOOP, OPTIM)
    )
    assert int(state.step) == stop and (saved_at.epoch, saved_at.batches_done) == position
    resumed, metrics = train(
        model,
        digits,
        LOOP,
        OPTIM,
        progress=False,
        phase=Phase(resume=(state, saved_at)),
        saving=Saving(checkpoints),
    )

    assert int(resumed.step) == int(reference.step) == 12
    assert leaves_equal(resumed.params, reference.params)
    assert leaves_equal(resumed.opt_state, reference.opt_state)
    assert leaves_equal(resumed.model_state, reference.model_state)
    for key in ("train_loss", "test_accuracy", "test_nll/wrn-10-1"):
        assert metrics[key] == reference_metrics[key], key


def test_checkpoints_are_kept_every_n_epochs_and_pruned(digits, model, tmp_path):
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=2)
    train(model, digits, LOOP, OPTIM, progress=False, saving=Saving(checkpoints, every_epochs=1))
    assert checkpoints.steps() == [8, 12]  # 4 steps an epoch, 3 saved; the last two kept


def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(digits, model, tmp_path):
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=3)
    train(model, digits, LOOP, OPTIM, progress=False, saving=Saving(checkpoints))
    assert checkpoints.steps() == [4, 8, 12]
    for path in (tmp_path / "ckpt" / "12").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    messages = []
    state, position, _ = checkpoints.restore_latest(
        lambda meta: abstract_train_state(model, digits, LOOP, OPTIM), log=messages.append
    )
    assert int(state.step) == 8 and position.epoch == 3
    assert len(messages) == 1 and "step 12" in messages[0] and "unreadable" in messages[0]


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(digits, model, tmp_path):
    def poison(model, state):
        nan = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), state.params)
        return model, state._replace(params=nan)

    checkpoints = Checkpoints(tmp_path / "ckpt")
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(
            model,
            digits,
            LOOP,
            OPTIM,
            progress=False,
            phase=Phase(interventions={2: poison}),
            saving=Saving(checkpoints),
        )
    assert checkpoints.steps() == [4]
    state, _, _ = checkpoints.restore_latest(
        lambda meta: abstract_train_state(model, digits, LOOP, OPTIM)
    )
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(state.params))


def test_checkpoints_every_n_steps_land_mid_epoch_and_resume_exactly(digits, model, tmp_path):
    reference, reference_metrics = train(model, digits, LOOP, OPTIM, progress=False)
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=10)
    train(
        model,
        digits,
        LOOP,
        OPTIM,
        progress=False,
        saving=Saving(checkpoints, every_epochs=0, every_steps=5),
    )
    assert checkpoints.steps() == [5, 10, 12]  # 4 steps an epoch, and the end

    checkpoints.manager.delete(12)  # as if the run had been killed after step 10
    state, position, _ = checkpoints.restore_latest(
        lambda meta: abstract_train_state(model, digits, LOOP, OPTIM)
    )
    assert (int(state.step), position.epoch, position.batches_done) == (10, 3, 2)
    resumed, metrics = train(
        model, digits, LOOP, OPTIM, progress=False, phase=Phase(resume=(state, position))
    )
    assert leaves_equal(resumed.params, reference.params)
    assert leaves_equal(resumed.opt_state, reference.opt_state)
    for key in ("train_loss", "test_accuracy"):
        assert metrics[key] == reference_metrics[key], key


# --- faults: corrupt checkpoints, failed writes, kills ------------------------------------------


def corrupt(step_dir: Path) -> None:
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")


def test_a_corrupt_latest_checkpoint_is_moved_aside_and_its_step_saved_again_every_time(
    digits, model, tmp_path
):
    """Each rerun after a corruption resumes from the step before and ends like the whole run."""
    reference, _ = train(model, digits, LOOP, OPTIM, progress=False)
    train(model, digits, LOOP, OPTIM, progress=False, saving=Saving(Checkpoints(tmp_path)))
    for aside in ("12.corrupt", "12.corrupt-1"):
        corrupt(tmp_path / "12")
        checkpoints, messages = Checkpoints(tmp_path), []  # as a rerun opens them
        state, position, _ = checkpoints.restore_latest(
            lambda meta: abstract_train_state(model, digits, LOOP, OPTIM), log=messages.append
        )
        assert int(state.step) == 8 and position.epoch == 3
        assert len(messages) == 1 and f"moved to {tmp_path / aside}" in messages[0]
        assert (tmp_path / aside).is_dir() and checkpoints.steps() == [4, 8]
        resumed, _ = train(
            model,
            digits,
            LOOP,
            OPTIM,
            progress=False,
            phase=Phase(resume=(state, position)),
            saving=Saving(checkpoints),
        )
        assert checkpoints.steps() == [4, 8, 12]
        assert leaves_equal(resumed.params, reference.params)


@pytest.fixture
def disk_full_from_save(monkeypatch):
    """Orbax writes fail from the n-th save on, leaving a half-written temporary directory."""
    import errno

    import orbax.checkpoint as ocp

    real_save, saves = ocp.CheckpointManager.save, []

    def set_failing_from(n: int | None):
        """Saves fail from the `n`-th on (counting from now); None: the disk is freed."""
        saves.clear()
        if n is None:
            monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
            return

        def save(self, step, *args, **kwargs):
            saves.append(step)
            if len(saves) < n:
                return real_save(self, step, *args, **kwargs)
            partial = Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1764"
            partial.mkdir()
            (partial / "half-written").write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ocp.CheckpointManager, "save", save)

    return set_failing_from


def test_a_failed_write_is_one_error_and_leaves_the_earlier_checkpoints_and_no_debris(
    digits, model, tmp_path, disk_full_from_save
):
    disk_full_from_save(2)
    checkpoints = Checkpoints(tmp_path)
    message = (
        f"could not write the checkpoint of step 8 in {tmp_path}: No space left on device; "
        "the checkpoint of step 4 is intact"
    )
    with pytest.raises(CheckpointError) as error:
        train(model, digits, LOOP, OPTIM, progress=False, saving=Saving(checkpoints))
    assert str(error.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4"]
    assert checkpoints.steps() == [4]


def test_the_command_line_reports_a_full_disk_in_one_line_and_resumes_once_freed(
    tmp_path, disk_full_from_save, capsys
):
    from experiments.cli import main

    # 2 steps an epoch, 4 in all: the schedule, model and data of test_budget_sweep's full
    # model, whose compiled step this run shares
    argv = ["train", "--arch", "wrn-10-1", "--train-size", "64", "--test-size", "64"]
    argv += ["--batch-size", "32", "--dense", "--epochs", "2", "--quiet"]
    argv += ["--output-dir", str(tmp_path)]
    disk_full_from_save(2)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        f"npas: error: could not write the checkpoint of step 4 in {tmp_path / 'checkpoints'}: "
        "No space left on device; the checkpoint of step 2 is intact\n"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    disk_full_from_save(None)
    code, out = main(argv), capsys.readouterr().out
    assert code == 0 and "resuming training from step 2 (epoch 2" in out
    assert (tmp_path / "summary.json").exists()


KILLED = [
    "train", "--arch", "wrn-10-1", "--train-size", "96", "--test-size", "48", "--batch-size",
    "32", "--budget", "80%", "--epochs", "4", "--search-epochs", "2", "--unshare-epoch", "1",
    "--checkpoint-steps", "2", "--quiet",
]  # fmt: skip
"""3 steps an epoch: the search phase is steps 1-6, the final training steps 1-12, and both
save every 2 steps."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The files of a KILLED run left alone, and its search.json."""
    from experiments.cli import main

    out = tmp_path_factory.mktemp("whole")
    assert main([*KILLED, "--output-dir", str(out)]) == 0
    return run_files(out), json.loads((out / "search.json").read_text())


def test_a_run_killed_in_the_search_phase_resumes_there_and_ends_the_same(
    tmp_path, uninterrupted, capsys
):
    from experiments.cli import main

    argv = [*KILLED, "--output-dir", str(tmp_path)]
    seen = kill_once(argv, lambda out: saved_steps(out / "search_checkpoints"))
    # Killed while running, after the search phase's first checkpoint (step 2) and before
    # the split was written or the final training saved anything.
    assert seen["running"] and seen["search"] and max(seen["search"]) < 6, seen
    assert not seen["searched"] and not seen["training"], seen
    assert main(argv) == 0
    resumed = f"resuming the search phase from step {max(seen['search'])} "
    assert resumed in capsys.readouterr().out
    assert run_files(tmp_path) == uninterrupted[0]


def test_a_run_killed_in_the_final_training_resumes_there_and_ends_the_same(
    tmp_path, uninterrupted, capsys
):
    from experiments.cli import main

    argv = [*KILLED, "--output-dir", str(tmp_path)]
    seen = kill_once(argv, lambda out: max(saved_steps(out / "checkpoints"), default=0) >= 4)
    # Killed while running, after the final training saved step 4 (past the unsharing at
    # the end of epoch 1, step 3) and before its last step, 12.
    assert seen["running"] and seen["searched"] and seen["search"][-1] == 6, seen
    assert 4 <= max(seen["training"]) < 12, seen
    assert main(argv) == 0
    resumed = f"resuming training from step {max(seen['training'])} "
    assert resumed in capsys.readouterr().out
    assert run_files(tmp_path) == uninterrupted[0]


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes_to_the_same_result(
    tmp_path, uninterrupted, capsys
):
    from experiments.cli import main

    argv = [*KILLED, "--output-dir", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *argv],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600  # catches a hang only
    while not saved_steps(tmp_path / "checkpoints") and process.poll() is None:
        assert time.time() < deadline, "no checkpoint in 600 s"
        time.sleep(0.01)  # the final training saved step 2; the unsharing at step 3 is ahead
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    if process.returncode == 0:
        pytest.fail("the run finished before the signal reached it; give it more epochs")
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert not (tmp_path / "summary.json").exists()
    stopped = max(saved_steps(tmp_path / "checkpoints"))
    assert 2 <= stopped < 12, stopped

    assert main(argv) == 0
    assert f"resuming training from step {stopped} " in capsys.readouterr().out
    assert run_files(tmp_path) == uninterrupted[0]


def test_a_run_stopped_in_the_search_phase_resumes_there_and_ends_the_same(
    tmp_path, uninterrupted, monkeypatch
):
    from contextlib import contextmanager

    from experiments import cli, run

    config = cli.config_from_args(cli.parse_args([*KILLED, "--output-dir", str(tmp_path)]))

    @contextmanager
    def stop_in_the_search_phase():
        # A stop is asked for twice before the first step (before and after loading the
        # data), then once a step: the 5th call is at step 3 of the search phase's 6.
        yield stop_after(5)

    monkeypatch.setattr(run, "stop_requests", stop_in_the_search_phase)
    with pytest.raises(Interrupted, match="step 3"):
        run.run_training(config, progress=False, log=lambda _: None)
    assert Checkpoints(tmp_path / "search_checkpoints").steps()[-1] == 3
    assert not Checkpoints(tmp_path / "checkpoints").steps()
    assert not (tmp_path / "search.json").exists()
    monkeypatch.undo()

    lines = []
    run.run_training(config, progress=False, log=lines.append)
    assert any(line.startswith("resuming the search phase from step 3") for line in lines)
    files, search = uninterrupted
    assert run_files(tmp_path) == files
    assert json.loads((tmp_path / "search.json").read_text()) == search
