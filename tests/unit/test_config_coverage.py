"""Every config field is set to a non-default value by some test (issue 15).

A field no test changes is a field whose behaviour nothing checks. This test reads the test sources and the
configs they load, collects every field they set and to what, and fails naming each schema field that is
never set to something other than its default — unless it is on the allow-list below, with the reason.

What counts as setting a field (the forms the tests use):
  * an override string `section.field=value` (also inside f-strings and inside YAML override lists);
  * a YAML file under configs/ that a test names;
  * keyword arguments of a config section class, e.g. `OptimConfig(weight_decay=0.1)` (covers that field
    wherever the class is used, since the code under test is the section's), or of a test helper that
    passes its `**options` on to such a class;
  * a nested dict given to `build_config` / `RunConfig.model_validate`;
  * an assignment `cfg.section.field = value`.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel

from rlhf_ray import config as config_module
from rlhf_ray.config import RunConfig, _parse_override, _section_type

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = re.compile(r"([a-z_]+(?:\.[a-z_0-9]+)+)=(.*)", re.S)
UNKNOWN = object()  # a value the scan cannot evaluate (a variable): counted as set

# Fields that cannot be exercised on this CPU-only machine, each with why. Keep it short.
ALLOWED_UNSET = {
    "placement.critic.gpus": "GPU count: no GPU here (the gpu placement path runs in tests/gpu/).",
    "placement.reward.gpus": "GPU count: no GPU here.",
}


def schema_fields(cls: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[str]:
    """Every leaf field as a dotted path; items of a list of sections appear as `list.*.field`."""
    for name, field in cls.model_fields.items():
        section = _section_type(field.annotation)
        if section is None:
            yield prefix + name
        else:
            star = ".*" if "list" in str(field.annotation) else ""
            yield from schema_fields(section, f"{prefix}{name}{star}.")


def default_at(path: str) -> Any:
    """The default value of a leaf field (list items: the item class's own default)."""
    node: Any = RunConfig()
    for part in path.split("."):
        if isinstance(node, list):
            node = node[0] if node else UNKNOWN
            if part == "*":
                continue
        if node is UNKNOWN or not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return UNKNOWN
        node = getattr(node, part)
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


def normalise(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def leaf_settings(path: str, value: Any) -> Iterator[tuple[str, Any]]:
    """(leaf path, value) pairs that setting `path` to `value` amounts to (dicts and section lists unfold)."""
    path = normalise(path)
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from leaf_settings(f"{path}.{key}" if path else str(key), sub)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for item in value:
            yield from leaf_settings(f"{path}.*", item)
    else:
        yield path, value
        if isinstance(value, list):  # override lists (pipeline.*_overrides) hold override strings
            for item in value:
                yield from override_settings(item)


def override_settings(text: Any) -> Iterator[tuple[str, Any]]:
    if not isinstance(text, str):
        return
    match = OVERRIDE.fullmatch(text.strip())
    if match is None:
        return
    if "{" in match.group(2):  # an f-string placeholder: some computed value
        yield normalise(match.group(1)), UNKNOWN
        return
    key, value = _parse_override(text.strip())
    yield from leaf_settings(key, value)


def literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return UNKNOWN


def section_classes() -> dict[str, list[str]]:
    """Section class name → the dotted prefixes where that class is used."""
    prefixes: dict[str, list[str]] = {}
    for path in schema_fields():
        head, _, _ = path.rpartition(".")
        cls: Any = RunConfig
        for part in head.split(".") if head else []:
            if part != "*":
                cls = _section_type(cls.model_fields[part].annotation)
        for base in cls.__mro__:  # OptimConfig(...) covers CriticOptimConfig's fields as well
            if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
                prefixes.setdefault(base.__name__, [])
                if head not in prefixes[base.__name__]:
                    prefixes[base.__name__].append(head)
    return prefixes


def forwarding_helpers(tree: ast.AST, classes: dict[str, list[str]]) -> dict[str, list[str]]:
    """Test helpers `def make(x, **options): ... Cls(..., **options)`: their keywords set Cls's fields."""
    helpers = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or fn.args.kwarg is None:
            continue
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and _name(call) in classes and any(
                    kw.arg is None and isinstance(kw.value, ast.Name) and kw.value.id == fn.args.kwarg.arg
                    for kw in call.keywords):
                helpers[fn.name] = classes[_name(call)]
    return helpers


def _name(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")


def python_settings(source: str, classes: dict[str, list[str]]) -> Iterator[tuple[str, Any]]:
    tree = ast.parse(source)
    classes = classes | forwarding_helpers(tree, classes)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            yield from override_settings(node.value)
        elif isinstance(node, ast.JoinedStr):
            yield from override_settings("".join(v.value if isinstance(v, ast.Constant) else "{x}"
                                                 for v in node.values))
        elif isinstance(node, ast.Call):
            yield from _call_settings(node, classes)
        elif isinstance(node, ast.Assign):
            yield from _assign_settings(node)


def _call_settings(node: ast.Call, classes: dict[str, list[str]]) -> Iterator[tuple[str, Any]]:
    name = _name(node)
    if name in classes:
        for kw in node.keywords:
            if kw.arg is None:  # **options: a dict literal elsewhere in the test; see the dict scan
                continue
            for prefix in classes[name]:
                yield from leaf_settings(f"{prefix}.{kw.arg}" if prefix else kw.arg, literal(kw.value))
    if name in ("build_config", "model_validate") and node.args and isinstance(node.args[0], ast.Dict):
        value = literal(node.args[0])
        if isinstance(value, dict):
            yield from leaf_settings("", value)


def _assign_settings(node: ast.Assign) -> Iterator[tuple[str, Any]]:
    for target in node.targets:
        parts = []
        while isinstance(target, ast.Attribute):
            parts.append(target.attr)
            target = target.value
        if len(parts) >= 2:
            yield ".".join(reversed(parts)), literal(node.value)


def is_change(path: str, value: Any) -> bool:
    default = default_at(path)
    return value is UNKNOWN or default is UNKNOWN or value != default


def settings_in_tests() -> dict[str, set[str]]:
    """Leaf path → the test files (or configs) that set it to a non-default value."""
    classes = section_classes()
    found: dict[str, set[str]] = {}
    sources = sorted((ROOT / "tests").rglob("*.py"))
    named = set()
    for file in sources:
        text = file.read_text()
        named |= set(re.findall(r"([a-z_0-9.]+\.yaml)", text))
        for path, value in python_settings(text, classes):
            if is_change(path, value):
                found.setdefault(path, set()).add(file.name)
    for name in sorted(named):
        file = ROOT / "configs" / name
        if file.is_file():
            for path, value in leaf_settings("", yaml.safe_load(file.read_text()) or {}):
                if is_change(path, value):
                    found.setdefault(path, set()).add(name)
    return found


def test_every_config_field_is_set_by_some_test():
    fields = set(schema_fields())
    found = settings_in_tests()
    unset = sorted(f for f in fields if f not in found and f not in ALLOWED_UNSET)
    assert not unset, ("config fields no test sets to a non-default value (add a test that changes each and "
                       "asserts what it does, or allow-list it with the reason):\n  " + "\n  ".join(unset))


def test_allow_list_names_real_fields_that_are_really_unset():
    fields = set(schema_fields())
    stale = sorted(set(ALLOWED_UNSET) - fields)
    assert not stale, f"allow-listed fields not in the schema: {stale}"
    covered = sorted(f for f in ALLOWED_UNSET if f in settings_in_tests())
    assert not covered, f"allow-listed fields that a test now sets (remove them from ALLOWED_UNSET): {covered}"


def test_scan_sees_each_form_of_setting_a_field():
    """The scanner itself: each form the module docstring lists is recognised, defaults are not."""
    classes = section_classes()
    source = '''
cfg = load_config(None, ["algo.epochs=2", "algo.gamma=1.0", f"trainer.output_dir={tmp}"])
opt = OptimConfig(weight_decay=0.1, lr=OptimConfig().lr)
raw = build_config({"rollout": {"top_k": 5}})
cfg.algo.entropy_coef = 0.01
def client(url, **options):
    return HttpReward(HttpSourceConfig(url=url, **options))
client("http://x", retries=5)
'''
    seen = {p for p, v in python_settings(source, classes) if is_change(p, v)}
    assert {"algo.epochs", "trainer.output_dir", "policy_optim.weight_decay", "critic_optim.weight_decay",
            "rollout.top_k", "algo.entropy_coef",
            "reward.sources.*.http.retries", "label.labeler.http.retries"} <= seen
    assert "algo.gamma" not in seen  # 1.0 is the default: not a change
    assert list(override_settings("pipeline.ppo_overrides=[algo.kl.adaptive=true]")) == [
        ("pipeline.ppo_overrides", ["algo.kl.adaptive=true"]), ("algo.kl.adaptive", True)]
    assert config_module.RunConfig is RunConfig
