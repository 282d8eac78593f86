"""CPU time per Atari observation of `submit shards atari` against the bare emulator.

The baseline plays the same games with the same emulator settings (gymnasium's ALE v5 env, frame
skip 4 by hand, sticky actions 0.25, grayscale screens) and random actions, and keeps nothing. The
measured path is `write_atari_shards`: the same play plus the max-of-two-screens resize to 84x84,
the RAM copies, the chunking and the shard writing. Their ratio is what selfsup adds to the
emulator. CPU time of this process (`time.process_time`), so a busy machine inflates it less than
wall time; medians of --repeats, the two variants alternated.

    python benchmarks/atari_generation.py --frames 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import load_average, machine_line, median  # noqa: E402

GAMES = ["Pong", "Breakout"]
GOAL_MS = 3.0  # 10,000 observations in under 30 s of CPU


def bare_emulator(frames: int, seed: int = 0) -> float:
    """CPU seconds to play `frames` observations per game (frame skip 4) and keep nothing."""
    import ale_py
    import gymnasium as gym
    import numpy as np

    from selfsup.data.atari import FRAME_SKIP, STICKY_EMULATOR

    gym.register_envs(ale_py)
    cpu = time.process_time()
    for game in GAMES:
        env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=STICKY_EMULATOR,
                       obs_type="grayscale", full_action_space=False)
        rng = np.random.default_rng(seed)
        env.reset(seed=seed)
        for _ in range(frames):
            action = int(rng.integers(env.action_space.n))
            for _ in range(FRAME_SKIP):
                _, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    env.reset()
                    break
        env.close()
    return time.process_time() - cpu


def selfsup_shards(frames: int, seed: int = 0) -> float:
    """CPU seconds of `write_atari_shards` for `frames` train observations per game."""
    from selfsup.data.atari import write_atari_shards

    with tempfile.TemporaryDirectory() as out:
        cpu = time.process_time()
        write_atari_shards(Path(out) / "a", GAMES, frames=frames * len(GAMES), test_frames=0, seed=seed)
        return time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000, help="observations per game")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine_line())
    bare_emulator(50), selfsup_shards(50)  # warm-up: imports, ROM loading
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_emulator(args.frames))
        ours.append(selfsup_shards(args.frames))
    per = 1e3 / (args.frames * len(GAMES))
    print(f"load average at the end: {load_average()}; {args.repeats} runs each, {args.frames} observations per game")
    print("\n| variant | CPU ms per observation (median) | / bare emulator | goal |")
    print("|---|---:|---:|---:|")
    print(f"| bare emulator (play only) | {per * median(bare):.2f} | 1.00 | |")
    print(f"| `submit shards atari` | {per * median(ours):.2f} | {median(ours) / median(bare):.2f} | < {GOAL_MS} ms |")


if __name__ == "__main__":
    main()
