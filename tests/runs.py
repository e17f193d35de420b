"""What the training tests read from a run: its config, metrics and checkpoints."""
import json
import os

from tests import lm_test_config


def tiny_config(steps: int = 6, **train_overrides):
  """`tests/lm_test_config.py:tiny` for `steps` steps, evaluated at the last one."""
  c = lm_test_config.get_config("tiny")
  c.train.update(steps=steps, eval_every=steps)
  c.train.update(train_overrides)
  return c


def metric_rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  """{step: train_loss} of a run's metrics.jsonl."""
  return {r["step"]: r["train_loss"] for r in metric_rows(workdir) if "train_loss" in r}


def checkpoint_steps(workdir: str) -> list[int]:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit())


def overwrite_middle(data_dir, count: int = 64):
  """Inverts `count` bytes in the middle of the largest file of `data_dir`, a failing
  disk: sizes and everything orbax checks stay as they were."""
  name = max(os.listdir(data_dir), key=lambda n: os.path.getsize(os.path.join(data_dir, n)))
  path = os.path.join(data_dir, name)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(count)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(255 - b for b in chunk))


def signal_at_step(monkeypatch, owner, method: str, step: int, signum: int,
                   step_arg: int):
  """Sends `signum` to this process right after `owner.method` ran for `step` (its
  positional argument `step_arg`, after self): a real signal in the middle of a run.
  Returns the real method."""
  real = getattr(owner, method)

  def then_signal(self, *args):
    real(self, *args)
    if args[step_arg] == step:
      os.kill(os.getpid(), signum)
  monkeypatch.setattr(owner, method, then_signal)
  return real
