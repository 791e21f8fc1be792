"""Shared pieces of the offline-RL example (examples/rl/): environments, the dataset format,
trajectories and D4RL's normalized score.

Dataset files (``.npz``, D4RL's keys): ``observations [N, obs_dim]`` float32, ``actions
[N, act_dim]`` float32, ``rewards [N]`` float32, ``terminals [N]`` bool (the environment
ended the episode: the hopper fell), ``timeouts [N]`` bool (the episode was cut: the time
limit, the end of the recording, or a resumed training run). Row i is one transition
``(s_i, a_i, r_i)``; an episode ends at a row with ``terminals | timeouts``, and the last row
of a file always ends one. Beside each file, ``<name>.json`` holds its metadata (env, recipe,
behaviour-policy step, seeds, returns).
"""
import json
import os
import zipfile
from typing import Dict, List

import numpy as np

ENVS = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")
"""The gymnasium MuJoCo environments the scripts accept (the D4RL locomotion set, v5)."""

DATASET_KEYS = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1}


def check_env_name(name: str) -> str:
    """Returns ``name`` if it is one of ``ENVS``; raises ValueError naming the choices."""
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}: choose one of {', '.join(ENVS)}")
    return name


def make_env(name: str, seed: int = None):
    """A gymnasium environment ``name`` (one of ``ENVS``), reset once with ``seed`` if given.

    Raises ValueError for another name, ImportError (saying what to install) without
    gymnasium's MuJoCo environments."""
    check_env_name(name)
    try:
        import gymnasium as gym
        import mujoco  # noqa: F401
    except ImportError as error:  # pragma: no cover - exercised only without the rl extra
        raise ImportError("the offline-RL example needs gymnasium's MuJoCo environments and "
                          "stable-baselines3: scripts/run.sh setup installs them; or, in an aaren "
                          "checkout, pip install --no-build-isolation '.[rl]' (it rebuilds aaren: "
                          "prefix AAREN_CUDA=OFF on a machine without a GPU)") from error
    env = gym.make(name)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def normalized_score(ret, random_return: float, expert_return: float):
    """D4RL's normalized return: ``100 * (ret - random_return) / (expert_return - random_return)``.

    ``ret``: a return (the sum of an episode's rewards) or an array of them; the result has its
    shape. 0 is the random policy, 100 the expert. Raises ValueError when the expert's return
    is not above the random policy's."""
    if not expert_return > random_return:
        raise ValueError(f"expert return {expert_return} must be above the random return "
                         f"{random_return}")
    return 100.0 * (np.asarray(ret, dtype=np.float64) - random_return) / (expert_return - random_return)


def save_dataset(path: str, data: Dict[str, np.ndarray], meta: dict) -> None:
    """Writes ``data`` (``DATASET_KEYS``) to ``path`` (.npz) and ``meta`` to the .json beside it,
    after ``check_dataset``; the last row is marked as an episode end (a timeout if it is
    not a terminal)."""
    data = {k: np.asarray(data[k]) for k in DATASET_KEYS}
    data["timeouts"] = data["timeouts"].astype(bool).copy()
    data["terminals"] = data["terminals"].astype(bool)
    if len(data["timeouts"]) and not data["terminals"][-1]:
        data["timeouts"][-1] = True
    check_dataset(data, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **data)
    os.replace(tmp, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)


def check_dataset(data: Dict[str, np.ndarray], where: str = "dataset") -> None:
    """Raises ValueError (naming ``where`` and the key) unless ``data`` has every key of
    ``DATASET_KEYS`` with its number of dimensions, one row count, finite values, and an episode
    end on the last row."""
    missing = [k for k in DATASET_KEYS if k not in data]
    if missing:
        raise ValueError(f"{where}: missing keys {missing} (a dataset has {list(DATASET_KEYS)})")
    n = len(data["rewards"])
    if n == 0:
        raise ValueError(f"{where}: no transitions")
    for key, ndim in DATASET_KEYS.items():
        value = np.asarray(data[key])
        if value.ndim != ndim or len(value) != n:
            raise ValueError(f"{where}: '{key}' has shape {value.shape}, expected {ndim} "
                             f"dimensions and {n} rows (as 'rewards')")
        if value.dtype != bool and not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: '{key}' has non-finite values")
    if not (bool(data["terminals"][-1]) or bool(data["timeouts"][-1])):
        raise ValueError(f"{where}: the last row ends no episode (terminals and timeouts both "
                         f"False)")


def load_dataset(path: str) -> Dict[str, np.ndarray]:
    """Reads a dataset .npz written by ``save_dataset`` (checked by ``check_dataset``); its
    metadata, when the .json is there, under key ``"meta"``. Raises FileNotFoundError (saying
    how to make one and where make_datasets.py writes it) for a missing file and ValueError
    (naming the file and the expected format) for another kind of file or a malformed one."""
    shown = os.path.normpath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no dataset file {shown}: python examples/rl/make_datasets.py "
                                f"--out DIR --env ENV writes DIR/<env>/<dataset>.npz (e.g. "
                                f"DIR/Hopper-v5/medium.npz, DIR/Hopper-v5/medium-replay.npz)")
    expected = (f"expected a dataset .npz of make_datasets.py (a NumPy .npz archive with "
                f"{', '.join(DATASET_KEYS)})")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{shown} is not a .npz archive: {expected}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{shown} could not be read ({error}): {expected}") from None
    check_dataset(data, path)
    meta_path = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            data["meta"] = json.load(f)
    return data


def split_trajectories(data: Dict[str, np.ndarray]) -> List[Dict[str, np.ndarray]]:
    """The episodes of a dataset, in order: a list of dicts with ``observations [T, obs_dim]``,
    ``actions [T, act_dim]``, ``rewards [T]``, ``timesteps [T]`` (0..T-1 from the episode's
    start), ``returns_to_go [T]`` (the sum of rewards from t to the episode's end) and
    ``terminal`` (bool)."""
    ends = np.flatnonzero(np.asarray(data["terminals"], bool) | np.asarray(data["timeouts"], bool))
    trajectories, start = [], 0
    for end in ends:
        rewards = np.asarray(data["rewards"][start:end + 1], dtype=np.float32)
        trajectories.append({
            "observations": np.asarray(data["observations"][start:end + 1], dtype=np.float32),
            "actions": np.asarray(data["actions"][start:end + 1], dtype=np.float32),
            "rewards": rewards,
            "timesteps": np.arange(end + 1 - start),
            "returns_to_go": np.cumsum(rewards[::-1])[::-1].astype(np.float32),
            "terminal": bool(data["terminals"][end]),
        })
        start = end + 1
    return trajectories


def episode_returns(data: Dict[str, np.ndarray]) -> np.ndarray:
    """The return (sum of rewards) of each episode of a dataset, ``[num_episodes]``."""
    return np.array([t["rewards"].sum() for t in split_trajectories(data)], dtype=np.float64)
