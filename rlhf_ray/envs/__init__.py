"""Environments for multi-turn and agentic RL (issue 17): the pure-Python layer a multi-turn rollout
loop calls between generations. No Ray, no engines: one environment instance per trajectory.

- `base.py`   `Environment` protocol (reset → first observation, step(action) → `StepResult`),
              `load_environment("module:Class")`, `SingleTurn` (a reward function as a one-step env),
              `env_return` (the reward source carrying an episode's return into training)
- `tools.py`  `<tool_call>` parsing, tool JSON schemas and prompts, `ToolSandbox` (tools in a separate
              process with a deadline and an output cap), `ToolEnvironment` (tool turns, then an answer)
- `sandbox_worker.py` the child side of `ToolSandbox`
- `toy.py`    tasks a tiny model can learn on CPU: `GuessingGame`, `CalculatorArithmetic`, their prompts

Everything here imports only the standard library at module load (transformers and the reward
package load lazily), so the sandbox's worker process starts in a fraction of a second.
"""

from rlhf_ray.envs.base import (
    Environment,
    LoadError,
    SingleTurn,
    StepResult,
    env_return,
    load_environment,
)
from rlhf_ray.envs.tools import (
    FAILURE_KINDS,
    ToolCall,
    ToolEnvironment,
    ToolResult,
    ToolSandbox,
    ToolSandboxError,
    parse_tool_calls,
    render_tools_prompt,
    tool_schema,
)

__all__ = [
    "FAILURE_KINDS",
    "Environment",
    "LoadError",
    "SingleTurn",
    "StepResult",
    "ToolCall",
    "ToolEnvironment",
    "ToolResult",
    "ToolSandbox",
    "ToolSandboxError",
    "env_return",
    "load_environment",
    "parse_tool_calls",
    "render_tools_prompt",
    "tool_schema",
]
