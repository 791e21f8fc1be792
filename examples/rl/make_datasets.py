"""Offline-RL datasets for the Decision Transformer benchmark, generated here because the
D4RL/Minari downloads are out of reach: D4RL's "medium" and "medium-replay" recipes on a
gymnasium MuJoCo environment, with a behaviour policy trained by stable-baselines3's SAC.

    python examples/rl/make_datasets.py --env Hopper-v5 --out DIR [--seed 0]
        [--sac-steps 100000] [--checkpoint-every 5000] [--medium-transitions 100000] [--quick]

Stages, each resumable (a finished stage is skipped; SAC training continues from its last
checkpoint: model, replay buffer and the recorded transitions, every --checkpoint-every steps):

1. SAC (SB3 defaults: two 256-unit layers, batch 256, lr 3e-4, one gradient step per
   environment step; ``learning_starts`` 10,000 as in the RL Zoo's Hopper setting) for
   --sac-steps environment steps, seeded; every transition it collects is recorded, and
   every checkpoint's deterministic policy is evaluated on --eval-episodes episodes.
2. Reference returns (the normalized score's 0 and 100): the uniformly random policy's mean
   return and the final SAC policy's (deterministic: the "expert"), over
   --reference-episodes episodes each, seeded. (D4RL's expert is a SAC trained for 1M+ steps;
   ours has the budget above, so scores are relative to our expert, not D4RL's.)
3. "medium": the first checkpoint whose evaluated return reaches --medium-fraction (1/3, as
   D4RL) of the expert's, rolled out with its stochastic policy for --medium-transitions
   steps. "medium-replay": every transition SAC collected up to that checkpoint (D4RL's
   replay buffer "until the policy reaches the medium level").

Writes to --out (never into the repository): ``<env>/sac/`` (checkpoints, recordings,
training log), ``<env>/references.json``, ``<env>/medium.npz`` and
``<env>/medium-replay.npz`` (format: rl_data.py), each with a .json of metadata.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rl_data import check_env_name, make_env, save_dataset  # noqa: E402

QUICK = dict(sac_steps=300, checkpoint_every=100, learning_starts=100, eval_episodes=1,
             reference_episodes=2, medium_transitions=300, max_episode_steps=100)


def _gym():
    import gymnasium as gym
    return gym


class Recorder:
    """Every transition the training environment makes, in order (the medium-replay data)."""

    def __init__(self):
        self.rows = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}

    def add(self, obs, action, reward, terminated, truncated):
        self.rows["observations"].append(np.asarray(obs, np.float32))
        self.rows["actions"].append(np.asarray(action, np.float32))
        self.rows["rewards"].append(np.float32(reward))
        self.rows["terminals"].append(bool(terminated))
        self.rows["timeouts"].append(bool(truncated))

    def cut(self):
        """Marks the last transition as an episode end (training resumed: the env was reset)."""
        if self.rows["rewards"] and not self.rows["terminals"][-1]:
            self.rows["timeouts"][-1] = True

    def __len__(self):
        return len(self.rows["rewards"])

    def arrays(self, upto=None):
        return {k: np.array(v[:upto]) for k, v in self.rows.items()}

    def save(self, path):
        np.savez(path + ".tmp.npz", **self.arrays())
        os.replace(path + ".tmp.npz", path)

    def load(self, path):
        with np.load(path) as f:
            for k in self.rows:
                self.rows[k] = list(f[k])


def recording_env(name, seed, recorder, max_episode_steps=None):
    """``make_env(name)`` wrapped so that each step is appended to ``recorder``."""
    gym = _gym()

    class Record(gym.Wrapper):
        def reset(self, **kw):
            self._obs, info = self.env.reset(**kw)
            return self._obs, info

        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            recorder.add(self._obs, action, reward, terminated, truncated)
            self._obs = obs
            return obs, reward, terminated, truncated, info

    env = make_env(name)
    if max_episode_steps:
        env = gym.wrappers.TimeLimit(env.unwrapped, max_episode_steps)
    env = Record(env)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def rollout_returns(env, policy, episodes, seed):
    """Mean and list of the returns of ``policy(obs) -> action`` over ``episodes`` episodes
    of ``env``, episode i reset with seed ``seed + i``."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns)), returns


def eval_env(name, max_episode_steps=None):
    env = make_env(name)
    if max_episode_steps:
        env = _gym().wrappers.TimeLimit(env.unwrapped, max_episode_steps)
    return env


def train_sac(args, sac_dir):
    """Stage 1 (resumable). Returns the training log: a list of ``{"step", "eval_return"}``."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    log_path = os.path.join(sac_dir, "log.json")
    done_path = os.path.join(sac_dir, "done.json")
    if os.path.exists(done_path):
        with open(log_path) as f:
            return json.load(f)
    os.makedirs(sac_dir, exist_ok=True)
    recorder = Recorder()
    env = recording_env(args.env, args.seed, recorder, args.max_episode_steps)
    evaluator = eval_env(args.env, args.max_episode_steps)
    model_path = os.path.join(sac_dir, "latest.zip")
    log = []
    if os.path.exists(model_path):
        model = SAC.load(model_path, env=env, device="cpu")
        model.load_replay_buffer(os.path.join(sac_dir, "latest_buffer.pkl"))
        recorder.load(os.path.join(sac_dir, "latest_recording.npz"))
        # one row per environment step: a run stopped while saving may have written the
        # recording or the log of a checkpoint whose model it did not save
        recorder.rows = {k: v[:model.num_timesteps] for k, v in recorder.rows.items()}
        recorder.cut()
        with open(log_path) as f:
            log = [e for e in json.load(f) if e["step"] <= model.num_timesteps]
        print(f"resuming SAC at step {model.num_timesteps}", flush=True)
    else:
        model = SAC("MlpPolicy", env, seed=args.seed, learning_starts=args.learning_starts,
                    buffer_size=max(args.sac_steps, 1000), verbose=0, device="cpu")

    class Checkpoint(BaseCallback):
        def __init__(self, bar):
            super().__init__()
            self.bar = bar

        def _on_step(self):
            self.bar.update(1)
            step = self.num_timesteps
            if step % args.checkpoint_every == 0:
                mean, returns = rollout_returns(
                    evaluator, lambda o: self.model.predict(o, deterministic=True)[0],
                    args.eval_episodes, seed=10_000 + step)
                self.model.save(os.path.join(sac_dir, f"step_{step}.zip"))
                log.append({"step": step, "eval_return": mean, "returns": returns,
                            "recorded_transitions": len(recorder), "time": time.time()})
                self.bar.set_postfix(eval_return=f"{mean:.0f}")
                # latest: written last, so that a resume finds a consistent set
                self.model.save_replay_buffer(os.path.join(sac_dir, "latest_buffer.pkl"))
                recorder.save(os.path.join(sac_dir, "latest_recording.npz"))
                with open(log_path + ".tmp", "w") as f:
                    json.dump(log, f, indent=1)
                os.replace(log_path + ".tmp", log_path)
                self.model.save(model_path + ".tmp.zip")
                os.replace(model_path + ".tmp.zip", model_path)
            return True

    remaining = args.sac_steps - model.num_timesteps
    with tqdm(total=args.sac_steps, initial=model.num_timesteps, desc=f"SAC {args.env}",
              mininterval=10, file=sys.stdout) as bar:
        if remaining > 0:
            model.learn(remaining, callback=Checkpoint(bar), reset_num_timesteps=False)
    recorder.save(os.path.join(sac_dir, "recording.npz"))
    with open(done_path, "w") as f:
        json.dump({"steps": model.num_timesteps}, f)
    return log


def references(args, sac_dir, path):
    """Stage 2 (resumable): the random and expert reference returns, written to ``path``."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from stable_baselines3 import SAC
    env = eval_env(args.env, args.max_episode_steps)
    env.action_space.seed(args.seed)
    seed = 20_000 + 1000 * args.seed
    random_mean, random_returns = rollout_returns(env, lambda o: env.action_space.sample(),
                                                  args.reference_episodes, seed)
    expert = SAC.load(os.path.join(sac_dir, "latest.zip"), device="cpu")
    expert_mean, expert_returns = rollout_returns(
        env, lambda o: expert.predict(o, deterministic=True)[0], args.reference_episodes, seed)
    refs = {"env": args.env, "random_return": random_mean, "expert_return": expert_mean,
            "random_returns": random_returns, "expert_returns": expert_returns,
            "expert": f"SAC seed {args.seed}, {expert.num_timesteps} environment steps, "
                      f"deterministic", "episodes": args.reference_episodes,
            "max_episode_steps": args.max_episode_steps or 1000}
    with open(path, "w") as f:
        json.dump(refs, f, indent=1)
    return refs


def medium_checkpoint(log, expert_return, fraction):
    """The first logged checkpoint whose eval return reaches ``fraction * expert_return``
    (the last one if none does)."""
    for entry in log:
        if entry["eval_return"] >= fraction * expert_return:
            return entry
    return log[-1]


def make_medium(args, sac_dir, refs, log, out_dir):
    """Stage 3 (resumable): medium.npz and medium-replay.npz."""
    from stable_baselines3 import SAC
    entry = medium_checkpoint(log, refs["expert_return"], args.medium_fraction)
    common = {"env": args.env, "behaviour_policy": "stable-baselines3 SAC", "sac_seed": args.seed,
              "medium_checkpoint_step": entry["step"],
              "medium_checkpoint_eval_return": entry["eval_return"],
              "expert_return": refs["expert_return"], "medium_fraction": args.medium_fraction}
    replay_path = os.path.join(out_dir, "medium-replay.npz")
    if not os.path.exists(replay_path):
        with np.load(os.path.join(sac_dir, "recording.npz")) as f:
            rows = {k: f[k][:entry["recorded_transitions"]] for k in f.files}
        save_dataset(replay_path, rows, dict(common, dataset="medium-replay",
                                             recipe="every transition SAC collected up to the "
                                                    "medium checkpoint"))
    medium_path = os.path.join(out_dir, "medium.npz")
    if not os.path.exists(medium_path):
        policy = SAC.load(os.path.join(sac_dir, f"step_{entry['step']}.zip"), device="cpu")
        policy.set_random_seed(args.seed + 1)
        recorder = Recorder()
        env = recording_env(args.env, 30_000 + args.seed, recorder, args.max_episode_steps)
        obs, _ = env.reset(seed=30_000 + args.seed)
        with tqdm(total=args.medium_transitions, desc="medium rollouts", mininterval=10,
                  file=sys.stdout) as bar:
            while len(recorder) < args.medium_transitions:
                obs, _, terminated, truncated, _ = env.step(policy.predict(obs, deterministic=False)[0])
                bar.update(1)
                if terminated or truncated:
                    obs, _ = env.reset()
        save_dataset(medium_path, recorder.arrays(), dict(
            common, dataset="medium", recipe=f"{args.medium_transitions} transitions of the "
                                             f"medium checkpoint's stochastic policy"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--out", required=True, help="output folder (outside the repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sac-steps", type=int, default=100_000)
    p.add_argument("--checkpoint-every", type=int, default=5000)
    p.add_argument("--learning-starts", type=int, default=10_000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--reference-episodes", type=int, default=20)
    p.add_argument("--medium-fraction", type=float, default=1 / 3)
    p.add_argument("--medium-transitions", type=int, default=100_000)
    p.add_argument("--max-episode-steps", type=int, default=None,
                   help="episode length limit (default: the environment's, 1000)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny budgets)")
    args = p.parse_args(argv)
    try:
        check_env_name(args.env)
    except ValueError as error:
        p.error(str(error))
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.sac_steps % args.checkpoint_every:
        p.error("--sac-steps must be a multiple of --checkpoint-every")
    torch.set_num_threads(1)
    out_dir = os.path.join(args.out, args.env)
    sac_dir = os.path.join(out_dir, "sac")
    log = train_sac(args, sac_dir)
    refs = references(args, sac_dir, os.path.join(out_dir, "references.json"))
    print(f"references: random {refs['random_return']:.1f}, expert {refs['expert_return']:.1f}",
          flush=True)
    make_medium(args, sac_dir, refs, log, out_dir)
    print(f"datasets in {out_dir}", flush=True)
    return out_dir


if __name__ == "__main__":
    main()
