"""Decision Transformer (Hugging Face ``transformers``' ``DecisionTransformerModel``) trained
on an offline dataset of examples/rl/make_datasets.py, with its attention (``transformer``) or
converted to Aaren by ``aaren.hf.convert`` (``aaren``), and evaluated online.

    python examples/rl/decision_transformer.py --data DIR/Hopper-v5/medium.npz
        --model {aaren,transformer} --seed S --out RUNS_DIR [--steps 5000] [--quick]

The two models are one architecture (same config, same initialization seed; Aaren replaces
each attention's query projection by a learned query) trained by one loop (AdamW, linear
warm-up, gradient clipping, action MSE; DT's hyperparameters, scaled down). They differ
only where each one's evaluation requires it, so that every model is trained on the inputs
it sees when it acts:

- ``transformer`` (DT as published): batches of ``--batch`` windows of ``--context`` (K)
  timesteps starting anywhere in a trajectory; acting, it reads the last K timesteps (a full
  forward over that window at each step).
- ``aaren``: acting, it streams with ``aaren.hf.DecisionTransformerStream`` from the
  episode's first step, in constant memory: at step t its state summarizes every earlier
  token, not the last K. It is therefore trained on whole trajectories from their first step
  (drawn uniformly, so that each transition weighs the same in expectation, as with the
  windows, until the batch holds at least ``--batch`` x K timesteps, the transformer's count
  of action targets; loss on every timestep), so that training sees what streaming sees.
  (A K-window-trained Aaren streamed from the start would meet contexts longer than any it
  was trained on.)

Evaluation: ``--eval-episodes`` episodes (10) in parallel, environment seeds ``10_000 * seed +
i``, return-to-go conditioned on the expert's reference return; the score is D4RL's
normalized return against the references of make_datasets.py. Every ``--eval-every`` steps
the same evaluation gives the learning curve. Writes ``RUNS_DIR/<env>/<dataset>/<model>/
seed<S>.json`` (config, curve, final returns and scores; ``"quick": true`` for a ``--quick``
run, which summarize.py leaves out) and a resumable checkpoint ``.pt``
beside it (a finished run is skipped).
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
from rl_data import load_dataset, make_env, normalized_score, split_trajectories  # noqa: E402

MODELS = ("aaren", "transformer")
QUICK = dict(steps=20, eval_every=10, eval_episodes=2, hidden=32, layers=1, heads=1, batch=4,
             warmup=5, max_episode_steps=50)


def build_model(kind, state_dim, act_dim, hidden=64, layers=2, heads=1, max_ep_len=1000,
                dropout=0.1, seed=0):
    """A ``DecisionTransformerModel`` (tanh actions), initialized with ``seed``; for ``kind``
    "aaren" converted by ``aaren.hf.convert`` (the learned queries drawn from the same seed).
    ``max_ep_len``: the number of timestep embeddings (timesteps 0..max_ep_len-1). Raises
    ValueError for another ``kind``."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}: choose one of {', '.join(MODELS)}")
    config = DecisionTransformerConfig(
        state_dim=state_dim, act_dim=act_dim, hidden_size=hidden, n_layer=layers, n_head=heads,
        n_inner=4 * hidden, max_ep_len=max_ep_len, n_positions=1024, action_tanh=True,
        attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout)
    torch.manual_seed(seed)
    model = DecisionTransformerModel(config)
    if kind == "aaren":
        import aaren.hf
        torch.manual_seed(seed + 1)
        aaren.hf.convert(model)
    return model


class Batches:
    """Training batches from a dataset's trajectories, as each model's evaluation reads them.

    ``windows(batch, K, rng)``: ``batch`` windows of K timesteps, each from a trajectory drawn
    with probability proportional to its length, starting at a uniform timestep, truncated at
    the trajectory's end and left-padded (DT's sampling). ``prefixes(min_timesteps, rng)``:
    whole trajectories drawn uniformly until they hold at least ``min_timesteps`` timesteps,
    right-padded to the longest. Both return float32
    tensors ``states [B, T, state_dim]`` (normalized by the dataset's mean and std),
    ``actions [B, T, act_dim]``, ``returns_to_go [B, T, 1]`` (divided by ``return_scale``),
    ``timesteps [B, T]`` long and ``mask [B, T]`` long (1 = a real timestep)."""

    def __init__(self, trajectories, state_mean, state_std, return_scale):
        self.trajs = trajectories
        self.mean, self.std, self.scale = state_mean, state_std, return_scale
        lengths = np.array([len(t["rewards"]) for t in trajectories], dtype=np.float64)
        self.p_len = lengths / lengths.sum()

    def _pack(self, pieces, length, left):
        b = len(pieces)
        sd = self.trajs[0]["observations"].shape[1]
        ad = self.trajs[0]["actions"].shape[1]
        out = {"states": np.zeros((b, length, sd), np.float32),
               "actions": np.zeros((b, length, ad), np.float32),
               "returns_to_go": np.zeros((b, length, 1), np.float32),
               "timesteps": np.zeros((b, length), np.int64), "mask": np.zeros((b, length), np.int64)}
        for i, (traj, lo, hi) in enumerate(pieces):
            n = hi - lo
            sl = slice(length - n, length) if left else slice(0, n)
            out["states"][i, sl] = (traj["observations"][lo:hi] - self.mean) / self.std
            out["actions"][i, sl] = traj["actions"][lo:hi]
            out["returns_to_go"][i, sl, 0] = traj["returns_to_go"][lo:hi] / self.scale
            out["timesteps"][i, sl] = traj["timesteps"][lo:hi]
            out["mask"][i, sl] = 1
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def windows(self, batch, context, rng):
        pieces = []
        for j in rng.choice(len(self.trajs), size=batch, p=self.p_len):
            traj = self.trajs[j]
            start = int(rng.integers(len(traj["rewards"])))
            pieces.append((traj, start, min(start + context, len(traj["rewards"]))))
        return self._pack(pieces, context, left=True)

    def prefixes(self, min_timesteps, rng):
        pieces, total = [], 0
        while total < min_timesteps:
            traj = self.trajs[int(rng.integers(len(self.trajs)))]
            pieces.append((traj, 0, len(traj["rewards"])))
            total += len(traj["rewards"])
        return self._pack(pieces, max(hi for _, _, hi in pieces), left=False)


def forward_actions(model, b):
    """The model's action predictions ``[B, T, act_dim]`` for a batch of ``Batches``."""
    return model(states=b["states"], actions=b["actions"], returns_to_go=b["returns_to_go"],
                 timesteps=b["timesteps"], attention_mask=b["mask"]).action_preds


@torch.no_grad()
def rollout(model, kind, env_name, seeds, target_return, state_mean, state_std, return_scale,
            context=20, max_episode_steps=None, record=False):
    """Runs ``len(seeds)`` episodes of ``env_name`` in parallel with the model acting, episode
    i reset with ``seeds[i]``; the return-to-go starts at ``target_return`` and drops by each
    reward (both in the environment's reward units; the model reads them divided by
    ``return_scale``). ``kind`` "aaren": one ``DecisionTransformerStream`` step per timestep
    from the episode's start (constant memory); "transformer": a full forward over the last
    ``context`` timesteps. Returns ``{"returns": [B], "lengths": [B]}``, plus with ``record``
    the model's inputs and chosen actions of every step (``states`` normalized ``[B, T,
    state_dim]``, ``actions``, ``returns_to_go`` scaled ``[B, T, 1]``, ``timesteps [B, T]``)."""
    import gymnasium as gym
    envs = []
    for s in seeds:
        env = make_env(env_name)
        if max_episode_steps:
            env = gym.wrappers.TimeLimit(env.unwrapped, max_episode_steps)
        envs.append(env)
    b = len(envs)
    obs = np.stack([e.reset(seed=int(s))[0] for e, s in zip(envs, seeds)]).astype(np.float32)
    act_dim = envs[0].action_space.shape[0]
    alive = np.ones(b, bool)
    returns, lengths = np.zeros(b), np.zeros(b, np.int64)
    rtg = torch.full((b, 1), float(target_return) / return_scale)
    mean, std = torch.as_tensor(state_mean), torch.as_tensor(state_std)
    hist = {"states": [], "actions": [], "returns_to_go": [], "timesteps": []}
    stream = None
    if kind == "aaren":
        import aaren.hf
        stream = aaren.hf.DecisionTransformerStream(model)
    t = 0
    while alive.any():
        state = (torch.from_numpy(obs) - mean) / std
        timestep = torch.full((b,), t, dtype=torch.long)
        hist["states"].append(state)
        hist["returns_to_go"].append(rtg.clone())
        hist["timesteps"].append(timestep)
        if stream is not None:
            action = stream.act(rtg, state, timestep)
        else:
            lo = max(0, t + 1 - context)
            window = {"states": torch.stack(hist["states"][lo:], 1),
                      "returns_to_go": torch.stack(hist["returns_to_go"][lo:], 1),
                      "timesteps": torch.stack(hist["timesteps"][lo:], 1),
                      "actions": torch.stack(hist["actions"][lo:] + [torch.zeros(b, act_dim)], 1)}
            window["mask"] = torch.ones(window["timesteps"].shape, dtype=torch.long)
            action = forward_actions(model, window)[:, -1]
        hist["actions"].append(action)
        if stream is not None:
            stream.observe(action)
        act = action.numpy()
        for i, env in enumerate(envs):
            if not alive[i]:
                continue
            o, r, terminated, truncated, _ = env.step(act[i])
            obs[i] = o
            returns[i] += r
            lengths[i] += 1
            rtg[i, 0] -= float(r) / return_scale
            alive[i] = not (terminated or truncated)
        t += 1
    out = {"returns": returns, "lengths": lengths}
    if record:
        out.update({k: torch.stack(v, 1) for k, v in hist.items()})
    return out


def run_path(out, env, dataset, kind, seed):
    return os.path.join(out, env, dataset, kind, f"seed{seed}.json")


def load_inputs(args):
    """The run's inputs: ``(data, meta, env_name, dataset, refs)`` (the dataset, its metadata,
    the environment, the dataset's name and the reference returns beside it). Raises
    FileNotFoundError for a missing dataset or references.json, ValueError for a file of
    another kind or a dataset whose environment is unknown."""
    data = load_dataset(args.data)
    meta = data.get("meta", {})
    env_name = meta.get("env") or args.env
    if env_name is None:
        raise ValueError(f"{args.data}: no metadata .json naming the environment; pass --env")
    dataset = os.path.splitext(os.path.basename(args.data))[0]
    refs_path = os.path.join(os.path.dirname(os.path.abspath(args.data)), "references.json")
    if not os.path.isfile(refs_path):
        raise FileNotFoundError(f"no {refs_path}: make_datasets.py writes the reference "
                                f"returns beside the datasets")
    with open(refs_path) as f:
        refs = json.load(f)
    return data, meta, env_name, dataset, refs


def train(args, inputs=None):
    """Trains and evaluates one (dataset, model, seed) run; returns its result dict (also
    written to ``run_path``). A finished run's JSON is read back instead. ``inputs``: what
    ``load_inputs(args)`` returns (read here when None)."""
    data, meta, env_name, dataset, refs = inputs if inputs is not None else load_inputs(args)
    path = run_path(args.out, env_name, dataset, args.model, args.seed)
    if os.path.exists(path):
        with open(path) as f:
            print(f"done already: {path}", flush=True)
            return json.load(f)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.set_num_threads(args.threads)
    trajs = split_trajectories(data)
    obs = data["observations"]
    state_mean, state_std = obs.mean(0).astype(np.float32), (obs.std(0) + 1e-6).astype(np.float32)
    batches = Batches(trajs, state_mean, state_std, args.return_scale)
    max_ep_len = max(max(len(t["rewards"]) for t in trajs), args.max_episode_steps or 1000)
    model = build_model(args.model, obs.shape[1], data["actions"].shape[1], args.hidden,
                        args.layers, args.heads, max_ep_len, args.dropout, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    rng = np.random.default_rng(args.seed)
    target = refs["expert_return"] if args.target_return is None else args.target_return
    config = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    config.update(env=env_name, dataset=dataset, target_return=target, dataset_file=os.path.basename(args.data))
    state = {"step": 0, "curve": [], "losses": [], "seconds": 0.0}
    ckpt = os.path.splitext(path)[0] + ".pt"
    if os.path.exists(ckpt):
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        rng.bit_generator.state = saved["rng"]
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        print(f"resuming {path} at step {state['step']}", flush=True)

    def evaluate():
        model.eval()
        seeds = [10_000 * args.seed + i for i in range(args.eval_episodes)]
        r = rollout(model, args.model, env_name, seeds, target, state_mean, state_std,
                    args.return_scale, args.context, args.max_episode_steps)
        model.train()
        valid = refs["expert_return"] > refs["random_return"]
        scores = (normalized_score(r["returns"], refs["random_return"], refs["expert_return"])
                  if valid else None)
        return {"returns": r["returns"].tolist(), "lengths": r["lengths"].tolist(),
                "normalized": None if scores is None else scores.tolist(),
                "normalized_mean": None if scores is None else float(scores.mean())}

    model.train()
    started = time.time() - state["seconds"]
    with tqdm(total=args.steps, initial=state["step"], mininterval=10, file=sys.stdout,
              desc=f"{env_name} {dataset} {args.model} seed {args.seed}") as bar:
        while state["step"] < args.steps:
            b = (batches.prefixes(args.batch * args.context, rng) if args.model == "aaren"
                 else batches.windows(args.batch, args.context, rng))
            pred = forward_actions(model, b)
            mask = b["mask"].unsqueeze(-1).float()
            loss = (((pred - b["actions"]) ** 2) * mask).sum() / (mask.sum() * pred.shape[-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            sched.step()
            state["step"] += 1
            state["losses"].append(loss.item())
            bar.update(1)
            if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
                ev = evaluate()
                state["seconds"] = time.time() - started
                state["curve"].append({"step": state["step"], "seconds": state["seconds"],
                                       "train_loss": float(np.mean(state["losses"][-args.eval_every:])),
                                       **ev})
                bar.set_postfix(score=ev["normalized_mean"], loss=f"{loss.item():.4f}")
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "rng": rng.bit_generator.state,
                            "torch_rng": torch.get_rng_state(), "state": state}, ckpt + ".tmp")
                os.replace(ckpt + ".tmp", ckpt)
    final = state["curve"][-1]
    result = {"env": env_name, "dataset": dataset, "model": args.model, "seed": args.seed,
              "quick": bool(args.quick), "normalized_return": final["normalized_mean"], "returns": final["returns"],
              "normalized": final["normalized"], "references": {
                  k: refs[k] for k in ("random_return", "expert_return", "expert")},
              "train_seconds": state["seconds"], "config": config, "curve": state["curve"],
              "dataset_meta": meta}
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a dataset .npz of make_datasets.py")
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder of the per-run JSON and checkpoints")
    p.add_argument("--env", default=None, help="only for a dataset without its metadata .json")
    p.add_argument("--steps", type=int, default=5_000, help="gradient steps")
    p.add_argument("--eval-every", type=int, default=1_250)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32,
                   help="windows per batch (transformer); aaren: whole trajectories holding at "
                        "least batch x context timesteps")
    p.add_argument("--context", type=int, default=20, help="K (transformer)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--return-scale", type=float, default=1000.0)
    p.add_argument("--target-return", type=float, default=None,
                   help="initial return-to-go (default: the expert reference return)")
    p.add_argument("--max-episode-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny budgets)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    try:  # a missing or wrong input file ends the script with its message (exit 2)
        inputs = load_inputs(args)
    except (FileNotFoundError, ValueError) as error:
        p.error(str(error))
    result = train(args, inputs)
    score = result["normalized_return"]
    print(f"{result['env']} {result['dataset']} {result['model']} seed {result['seed']}: "
          f"normalized return {score if score is None else round(score, 1)}", flush=True)
    return result


if __name__ == "__main__":
    main()
