"""Atari frames made on this machine with ale-py + gymnasium (ale-py ships the ROMs; nothing is
downloaded, and neither ROMs nor frames are ever committed).

Preprocessing as in the DQN Replay Dataset (Dopamine): the emulator runs with frame skip 1 and
sticky actions (repeat_action_probability 0.25, the `-v5` default); the agent acts every 4th emulator
frame, and the observation is the pixel-wise max of the last two grayscale screens of those 4,
resized to 84x84 (box filter, i.e. area averaging). The emulator's 128-byte RAM is stored with every
observation, for the RAM probe.

Policy: sticky-random. Uniform-random play keeps Pong's paddle jittering near where it starts (a
degenerate `player_y`); instead the agent keeps its previous action with probability
`ACTION_REPEAT` and otherwise draws a new one uniformly, so paddles sweep their whole range.

Shards hold *chunks* of episodes in order: frames `[C, 84, 84]` (one tall PNG), RAM `[C, 128]` and
a JSON header. A chunk owns the stack starts `[start, start + own)` of its episode and carries the
context frames that the temporal samples of those starts need (3 before, 5 after, cut at the
episode's borders), so a training sample never needs another chunk and never crosses a reset.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.core.errors import UserError, unknown_choice

FRAME_SIZE = 84
FRAME_SKIP = 4
STACK = 3  # frames per observation (the image channels)
OFFSET = 3  # o_{t-3} and o_{t+3}: the previous and next non-overlapping stacks
CONTEXT_BEFORE = OFFSET
CONTEXT_AFTER = OFFSET + STACK - 1
STICKY_EMULATOR = 0.25  # ALE's repeat_action_probability (the -v5 default)
ACTION_REPEAT = 0.8  # the agent keeps its previous action with this probability
MAX_EPISODE_FRAMES = 27_000  # 108k emulator frames, the usual cap
CHUNK_STARTS = 256  # stack starts owned by one shard sample
DEFAULT_GAMES = ("Pong", "Breakout")

# AtariARI annotations (Anand et al. 2019): RAM positions of the game-state variables
RAM_VARIABLES: dict[str, dict[str, int]] = {
    "Pong": {"player_y": 51, "player_x": 46, "enemy_y": 50, "enemy_x": 45, "ball_x": 49, "ball_y": 54,
             "enemy_score": 13, "player_score": 14},
    "Breakout": {"ball_x": 99, "ball_y": 101, "player_x": 72, "blocks_hit_count": 77, "score": 84},
}


def check_games(games: list[str] | tuple[str, ...]) -> list[str]:
    try:
        import ale_py
        import gymnasium as gym
    except ImportError as err:
        raise UserError(f"Atari play needs ale-py and gymnasium: pip install -e '.[atari]' ({err})") from None

    gym.register_envs(ale_py)
    out = []
    for game in games:
        game = game.strip()
        if f"ALE/{game}-v5" not in gym.registry:
            known = sorted(k[4:-3] for k in gym.registry if k.startswith("ALE/") and k.endswith("-v5"))
            raise unknown_choice("Atari game", game, known)
        out.append(game)
    if not out:
        raise UserError("no Atari game given (e.g. --games Pong,Breakout)")
    return out


def preprocess(screen_a: np.ndarray, screen_b: np.ndarray) -> np.ndarray:
    """Max of two consecutive grayscale screens [210, 160], area-resized to uint8 [84, 84]."""
    from PIL import Image

    frame = np.maximum(screen_a, screen_b)
    return np.asarray(Image.fromarray(frame).resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.BOX))


@dataclass
class Episode:
    game: str
    index: int  # per game, in play order
    frames: np.ndarray  # uint8 [L, 84, 84]
    ram: np.ndarray  # uint8 [L, 128]
    terminated: bool  # False: cut by the frame budget or the episode cap


def play(game: str, frames: int, seed: int, max_episode_frames: int = MAX_EPISODE_FRAMES) -> Iterator[Episode]:
    """Play `game` for `frames` observations in total (the last episode may be cut short; an
    episode longer than `max_episode_frames` observations is cut there and the game reset)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=STICKY_EMULATOR,
                   obs_type="grayscale", full_action_space=False, max_num_frames_per_episode=MAX_EPISODE_FRAMES * FRAME_SKIP)
    ale = env.unwrapped.ale
    rng = np.random.default_rng(seed)
    n_actions = env.action_space.n
    made, episode = 0, 0
    try:
        while made < frames:
            screen, _ = env.reset(seed=int(rng.integers(2**31)))
            prev_screen = screen
            obs, rams = [preprocess(screen, screen)], [ale.getRAM().copy()]
            action, done, terminated = int(rng.integers(n_actions)), False, False
            while not done and made + len(obs) < frames and len(obs) < max_episode_frames:
                if rng.random() >= ACTION_REPEAT:
                    action = int(rng.integers(n_actions))
                for _ in range(FRAME_SKIP):
                    prev_screen = screen
                    screen, _, terminated, truncated, _ = env.step(action)
                    if terminated or truncated:
                        done = True
                        break
                if terminated:
                    break  # the game-over screen is not an observation (as in the replay data)
                obs.append(preprocess(prev_screen, screen))
                rams.append(ale.getRAM().copy())
            made += len(obs)
            yield Episode(game, episode, np.stack(obs), np.stack(rams), terminated)
            episode += 1
    finally:
        env.close()


def stack_starts(length: int) -> int:
    """Observations (3-frame stacks) an episode of `length` frames gives: starts 0 .. length - 3."""
    return max(0, length - STACK + 1)


def episode_chunks(ep: Episode, split: str, chunk_starts: int = CHUNK_STARTS) -> Iterator[dict]:
    """Shard samples of one episode: chunks of `chunk_starts` stack starts with their context."""
    from selfsup.data.shards import encode_png

    length, n = len(ep.frames), stack_starts(len(ep.frames))
    for start in range(0, n, chunk_starts):
        own = min(chunk_starts, n - start)
        lo, hi = max(0, start - CONTEXT_BEFORE), min(length, start + own - 1 + CONTEXT_AFTER + 1)
        header = {"game": ep.game, "episode": f"{split}-{ep.game}-{ep.index:05d}", "episode_length": length,
                  "start": start, "own": own, "first_frame": lo, "terminated": ep.terminated}
        frames = ep.frames[lo:hi]
        yield {
            "__key__": f"{ep.game}-{ep.index:05d}-{start:06d}",
            "png": encode_png(frames.reshape(-1, FRAME_SIZE)),  # a tall [C*84, 84] image
            "ram.npy": _npy(ep.ram[lo:hi]),
            "json": json.dumps(header).encode(),
        }


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclass
class Chunk:
    """A decoded shard sample: frames and RAM of episode frames `first_frame ..`, owning stack
    starts `start .. start + own - 1` (all indices are positions in the episode)."""

    key: str
    game: str
    episode: str
    episode_length: int
    start: int
    own: int
    first_frame: int
    frames: np.ndarray  # uint8 [C, 84, 84]
    ram: np.ndarray  # uint8 [C, 128]

    def stack(self, t: int) -> np.ndarray:
        """o_t: episode frames t, t+1, t+2 as [3, 84, 84] (t must be a valid start of this episode)."""
        i = t - self.first_frame
        if t < 0 or t > self.episode_length - STACK or i < 0 or i + STACK > len(self.frames):
            raise IndexError(f"stack start {t} is outside chunk {self.key} (episode length {self.episode_length})")
        return self.frames[i : i + STACK]

    def triplet_starts(self, t: int) -> tuple[int, int, int]:
        """Starts of (o_t, o_{t-3}, o_{t+3}), clamped to the episode's valid starts."""
        last = self.episode_length - STACK
        return t, max(0, t - OFFSET), min(last, t + OFFSET)

    def ram_at(self, t: int) -> np.ndarray:
        """RAM after the last frame of o_t (the state the stack ends in)."""
        return self.ram[t + STACK - 1 - self.first_frame]

    def starts(self) -> range:
        return range(self.start, self.start + self.own)


def decode_chunk(sample: dict) -> Chunk:
    from PIL import Image

    header = json.loads(sample["json"])
    with Image.open(io.BytesIO(sample["png"])) as img:
        frames = np.array(img.convert("L")).reshape(-1, FRAME_SIZE, FRAME_SIZE)
    ram = np.load(io.BytesIO(sample["ram.npy"]), allow_pickle=False)
    if len(ram) != len(frames):
        raise ValueError(f"chunk {sample.get('__key__')}: {len(frames)} frames but {len(ram)} RAM rows")
    return Chunk(sample.get("__key__", "?"), header["game"], header["episode"], header["episode_length"],
                 header["start"], header["own"], header["first_frame"], frames, ram)


def split_samples(games: list[str], frames: int, split: str, seed: int, stats: dict,
                  max_episode_frames: int = MAX_EPISODE_FRAMES, chunk_starts: int = CHUNK_STARTS,
                  played: Callable[[int], object] = lambda frames: None) -> Iterator[dict]:
    """Chunks of every game in turn; `frames` observations in all, shared evenly across the games.
    `played(n)` hears of each episode's n observations as it is played."""
    per_game = [frames // len(games) + (i < frames % len(games)) for i in range(len(games))]
    for gi, (game, n) in enumerate(zip(games, per_game, strict=True)):
        for ep in play(game, n, seed=seed * 1000 + gi, max_episode_frames=max_episode_frames):
            played(len(ep.frames))
            stats["frames"] += len(ep.frames)
            stats["episodes"] += 1
            stats["samples"] += stack_starts(len(ep.frames))
            stats["per_game"].setdefault(game, {"frames": 0, "episodes": 0})
            stats["per_game"][game]["frames"] += len(ep.frames)
            stats["per_game"][game]["episodes"] += 1
            yield from episode_chunks(ep, split, chunk_starts)


def write_atari_shards(out: str | Path, games: list[str] | tuple[str, ...] = DEFAULT_GAMES, frames: int = 10_000,
                       test_frames: int | None = None, seed: int = 0, samples_per_shard: int = 20,
                       max_episode_frames: int = MAX_EPISODE_FRAMES, chunk_starts: int = CHUNK_STARTS) -> dict:
    """`submit shards atari OUT`: OUT/train and OUT/test (held-out episodes: other seeds), each with
    index.json counting temporal samples (stack starts) per shard (OUT may be a pipe: destination with
    `{split}`, selfsup/data/shards.py). Returns timing and counts."""
    from selfsup.data.shards import split_destination, write_shards
    from selfsup.core.progress import progress_bar

    games = check_games(list(games))
    if frames < 3 * len(games):
        raise UserError(f"--frames {frames} is too few for {len(games)} game(s)")
    if max_episode_frames < STACK + 2 * OFFSET:
        raise UserError(f"--max-episode-frames {max_episode_frames} is too short (at least {STACK + 2 * OFFSET})")
    test_frames = frames // 5 if test_frames is None else test_frames
    destinations = {split: split_destination(out, split) for split in ("train", "test")}  # a folder or pipe:
    report = {"games": games, "splits": {}}
    for split, n, split_seed in (("train", frames, seed), ("test", test_frames, seed + 1)):
        if n <= 0:
            continue
        stats = {"frames": 0, "episodes": 0, "samples": 0, "per_game": {}}
        wall, cpu = time.perf_counter(), time.process_time()
        # the bar counts observations played, whose total is known; the chunks written are not
        with progress_bar(total=n, desc=f"atari/{split} ({'+'.join(games)})", unit="frame") as bar:
            samples = split_samples(games, n, split, split_seed, stats, max_episode_frames, chunk_starts,
                                    played=bar.update)
            write_shards(samples, destinations[split], prefix=split,
                         samples_per_shard=samples_per_shard, progress=False,
                         weight=lambda s: json.loads(s["json"])["own"],
                         extra=lambda stats=stats, split_seed=split_seed: {"atari": {
                             "games": games, "frame_skip": FRAME_SKIP, "frame_size": FRAME_SIZE,
                             "sticky_actions": STICKY_EMULATOR, "policy": f"sticky-random (repeat p={ACTION_REPEAT})",
                             "seed": split_seed, "ram_variables": {g: RAM_VARIABLES.get(g, {}) for g in games}, **stats}})
        stats["wall_s"] = time.perf_counter() - wall
        stats["cpu_s"] = time.process_time() - cpu
        report["splits"][split] = stats
    return report


def report_line(report: dict, out) -> str:
    lines = [f"selfsup: wrote Atari shards ({', '.join(report['games'])}) to {out}"]
    for split, st in report["splits"].items():
        games = ", ".join(f"{g} {v['frames']} frames / {v['episodes']} episodes" for g, v in st["per_game"].items())
        lines.append(f"  {split}: {st['frames']} frames ({games}), {st['samples']} samples; "
                     f"{st['wall_s']:.1f} s wall ({st['frames'] / max(st['wall_s'], 1e-9):.0f} frames/s), "
                     f"{1e3 * st['cpu_s'] / max(st['frames'], 1):.2f} ms CPU per frame")
    return "\n".join(lines)


def atari_cache(split: str, cache_dir: str | Path | None = None, frames: int = 20_000) -> Path:
    """The built-in Atari data (Pong + Breakout), generated once into the cache on first use."""
    from selfsup.data.shards import INDEX_FILE, default_cache_dir

    root = Path(cache_dir or default_cache_dir()) / "shards" / "atari"
    if not (root / split / INDEX_FILE).exists():
        print(f"selfsup: generating built-in Atari frames ({', '.join(DEFAULT_GAMES)}) as shards into {root} (once)",
              flush=True)
        write_atari_shards(root, DEFAULT_GAMES, frames=frames)
    return root / split
