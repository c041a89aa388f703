"""The paper's Q-learning agent (docs/method.md, "The Q-learning agent").

The Q-network reads the state ``s[1..L-1]`` and outputs, for every block i = 1..L-1, one value
per action 0..i: ``(L+2)(L-1)/2`` numbers. ``Q(s, a) = sum_i Q(s)[i, a[i]]``, so the greedy action
is the per-block argmax and ``max_a Q(s, a)`` is the sum of the per-block maxima.

Input scaling (ours to choose): ``s[i] / (L-1)``, so every input lies in [0, 1] whatever L is.

Options that change the learning problem (all off by default, so the default agent is the paper's):
``reward_norm="running"`` standardises rewards with a running mean/std, so the Q targets stay on the
scale the network starts at (with a raw -PPL reward the targets are hundreds of times larger than the
predictions and every update just pushes down whatever was chosen); ``target_sync=N`` computes
``max_a' Q(s')`` with a copy of the network refreshed every N updates; ``switch_cost=c`` subtracts
``c`` per block whose state changed, so a structure that works is not abandoned for free;
``moves="local"`` makes every decision a local move from the current structure instead of a whole new
action vector: exploring re-draws one block's entry, exploiting changes only the block whose entry
gains most in Q (the network is decomposed per block, so that gain is read off directly), and only when
the gain exceeds ``keep_margin`` — the paper's agent re-copies trained blocks at almost every decision.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from megatie.errors import ConfigError

# The option names are defined torch-free (for the launcher's parser) and re-exported here.
from megatie.tying.options import MOVES, REWARD_NORMS, REWARDS, AgentConfig  # noqa: F401 (re-exported)
from megatie.tying.tie_map import validate_action, validate_state


def reward_from_loss(loss: float, kind: str, previous: float | None = None) -> float:
    """``neg-ppl`` (the paper): ``-exp(loss)``; ``neg-loss``: ``-loss`` (= ``-log PPL``);
    ``loss-drop``: ``previous - loss``, the loss one decision earlier minus the loss now.

    A level (-PPL, -loss) keeps rising over training whatever the agent does, so the agent credits
    whatever it chose late; the drop over one decision interval (the copy's damage plus k steps of
    training under the chosen structure) is what that decision contributed."""
    if kind == "loss-drop":
        if previous is None:
            raise ValueError("the loss-drop reward needs the loss measured at the previous decision")
        return previous - loss
    if kind == "neg-ppl":
        return -math.exp(min(loss, 80.0))  # exp(80) is already far beyond any PPL worth ranking
    if kind == "neg-loss":
        return -loss
    raise ConfigError(f"unknown reward {kind!r}; choose one of {', '.join(REWARDS)}")


class QNetwork(nn.Module):
    """MLP: (L-1) inputs -> 128 ReLU -> (L+2)(L-1)/2 outputs, one segment per block 1..L-1."""

    def __init__(self, num_blocks: int, hidden: int = 128):
        super().__init__()
        if num_blocks < 2:
            raise ConfigError("the Q-learning agent needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.num_outputs = (num_blocks + 2) * (num_blocks - 1) // 2
        self.net = nn.Sequential(
            nn.Linear(num_blocks - 1, hidden), nn.ReLU(), nn.Linear(hidden, self.num_outputs)
        )
        # Segment of block i starts at offsets[i-1]; it has i+1 entries (actions 0..i).
        offsets, o = [], 0
        for i in range(1, num_blocks):
            offsets.append(o)
            o += i + 1
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        # Mask of valid (block, action) cells in a padded [L-1, L] layout.
        idx = torch.full((num_blocks - 1, num_blocks), -1, dtype=torch.long)
        for i in range(1, num_blocks):
            idx[i - 1, : i + 1] = torch.arange(offsets[i - 1], offsets[i - 1] + i + 1)
        self.register_buffer("padded_index", idx, persistent=False)

    def encode(self, state) -> torch.Tensor:
        s = torch.as_tensor(state, dtype=torch.float32, device=self.offsets.device)
        return s[..., 1:] / (self.num_blocks - 1)

    def forward(self, state) -> torch.Tensor:
        """Flat Q-values, shape ``[..., (L+2)(L-1)/2]``."""
        return self.net(self.encode(state))

    def padded(self, q: torch.Tensor) -> torch.Tensor:
        """``[..., L-1, L]`` with invalid actions (j > i) set to -inf."""
        valid = self.padded_index >= 0
        gathered = q[..., self.padded_index.clamp(min=0)]
        return gathered.masked_fill(~valid, float("-inf"))

    def q_of_action(self, q: torch.Tensor, action) -> torch.Tensor:
        a = torch.as_tensor(action, dtype=torch.long, device=q.device)[..., 1:]
        return q[..., self.offsets + a].sum(-1)

    def greedy(self, q: torch.Tensor) -> list[int]:
        return [0] + self.padded(q).argmax(-1).tolist()

    def max_value(self, q: torch.Tensor) -> torch.Tensor:
        return self.padded(q).amax(-1).sum(-1)


class RunningStats:
    """Welford mean/variance of every reward seen so far (exact, order-independent state)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def normalise(self, x: float) -> float:
        # Before the spread is known, a reward carries no ranking information: centre it only.
        std = self.std
        return (x - self.mean) / std if std > 1e-12 else x - self.mean

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, sd: dict) -> None:
        self.count, self.mean, self.m2 = int(sd["count"]), float(sd["mean"]), float(sd["m2"])


class QLearningAgent:
    """Epsilon-greedy over whole action vectors, one TD(0) Adam step per decision."""

    def __init__(self, num_blocks: int, config: AgentConfig | None = None, seed: int = 0):
        self.config = config or AgentConfig()
        c = self.config
        if not (0 <= c.eps_min <= c.eps_start <= 1 and 0 < c.eps_decay <= 1 and 0 <= c.gamma < 1):
            raise ConfigError(f"invalid agent settings {c}")
        if (c.reward_norm not in REWARD_NORMS or c.moves not in MOVES or c.target_sync < 0
                or c.switch_cost < 0 or c.keep_margin < 0):
            raise ConfigError(f"invalid agent settings {c}: reward_norm must be one of {', '.join(REWARD_NORMS)}, "
                              f"moves one of {', '.join(MOVES)}, target_sync, switch_cost and keep_margin "
                              "non-negative")
        self.num_blocks = num_blocks
        # The agent's own generator: its exploration never shifts the trainer's random streams.
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.qnet = QNetwork(num_blocks, c.hidden)
        self.optimizer = torch.optim.Adam(self.qnet.parameters(), lr=c.lr)
        self.eps = c.eps_start
        self.reward_stats = RunningStats()
        self.updates = 0
        self.target_net = copy.deepcopy(self.qnet) if c.target_sync > 0 else None

    def random_action(self) -> list[int]:
        return [int(torch.randint(0, i + 1, (1,), generator=self.generator)) for i in range(self.num_blocks)]

    def greedy_action(self, state) -> list[int]:
        with torch.no_grad():
            return self.qnet.greedy(self.qnet(validate_state(state, self.num_blocks)))

    def act(self, state) -> tuple[list[int], bool]:
        """Return ``(action, explored)``: a random move with probability eps, else the greedy one."""
        explore = float(torch.rand((), generator=self.generator)) < self.eps
        if self.config.moves == "local":
            return self.local_move(state, explore), explore
        if explore:
            return self.random_action(), True
        return self.greedy_action(state), False

    def local_move(self, state, explore: bool) -> list[int]:
        """Change one block's entry of the action that produced ``state`` (each block naming its root).

        Block i may move to another root below it, or become its own root; entries that name a
        non-root would resolve to a root anyway (Eq. 1), so they are never candidates, and every move
        changes the structure. Re-pointing a root moves its whole group, still one block's decision."""
        current = list(validate_state(state, self.num_blocks))
        roots = [r for r in range(self.num_blocks) if current[r] == r]
        moves = [(i, c) for i in range(1, self.num_blocks)
                 for c in [r for r in roots if r < i] + [i] if c != current[i]]
        if explore:
            i, c = moves[int(torch.randint(0, len(moves), (1,), generator=self.generator))]
        else:
            with torch.no_grad():
                q = self.qnet.padded(self.qnet(current))  # [L-1, L]; row i-1 holds block i's entries
            gains = [float(q[i - 1, c] - q[i - 1, current[i]]) for i, c in moves]
            best = max(range(len(moves)), key=gains.__getitem__)
            if gains[best] <= self.config.keep_margin:
                return current
            i, c = moves[best]
        current[i] = c
        return current

    def update(self, state, action, reward: float, next_state) -> dict:
        """One TD step toward ``y = r + gamma * max_a' Q(s')``; decays eps afterwards."""
        action = validate_action(action, self.num_blocks)
        c = self.config
        raw = reward
        if c.reward_norm == "running":
            self.reward_stats.add(raw)
            reward = self.reward_stats.normalise(raw)
        if c.switch_cost:
            reward -= c.switch_cost * sum(a != b for a, b in zip(state, next_state))
        bootstrap = self.target_net if self.target_net is not None else self.qnet
        with torch.no_grad():
            target = reward + c.gamma * float(bootstrap.max_value(bootstrap(next_state)))
        q_sa = self.qnet.q_of_action(self.qnet(state), action)
        loss = (q_sa - target) ** 2
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        if self.target_net is not None and self.updates % c.target_sync == 0:
            self.target_net.load_state_dict(self.qnet.state_dict())
        self.eps = max(self.eps * c.eps_decay, c.eps_min)
        out = {"q_pred": float(q_sa.detach()), "td_target": float(target),
               "td_error": float(target - q_sa.detach()), "eps": self.eps}
        if reward != raw:
            out["shaped_reward"] = reward
        return out

    def state_dict(self) -> dict:
        sd = {"qnet": self.qnet.state_dict(), "optimizer": self.optimizer.state_dict(), "eps": self.eps,
              "generator": self.generator.get_state(), "updates": self.updates,
              "reward_stats": self.reward_stats.state_dict()}
        if self.target_net is not None:
            sd["target_net"] = self.target_net.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.qnet.load_state_dict(sd["qnet"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.eps = float(sd["eps"])
        self.generator.set_state(sd["generator"])
        self.updates = int(sd["updates"])
        self.reward_stats.load_state_dict(sd["reward_stats"])
        if self.target_net is not None:
            self.target_net.load_state_dict(sd["target_net"])

