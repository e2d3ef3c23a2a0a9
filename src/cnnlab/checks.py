"""`check(cfg)`: every value against its domain and the relations between values, right after composing.

`check(cfg)` runs before any data is read or model built, in train(), evaluate() and each tool, and refuses a
value in one line that names the key, the value and what it must be (a UserError). It checks, in turn:
- each value against its domain (cnnlab.domains: type, range, names; a key whose option is set to null is left out);
- each node with a `_target_`: that it imports and that every key is a parameter of what it builds
  (`+optimizer.foo=1` is refused here, not by a TypeError deep in a run);
- the relations between keys (cnnlab.relations: mean and std as long as the channels, the network's shapes fit its
  input, its weights and a batch fit this machine's memory, the devices exist, …);
- that the optimizer and its schedule accept their settings, by building them on one dummy weight (torch's
  own checks, for keys added with `+` as well).
"""

import inspect

from omegaconf import DictConfig, OmegaConf

from cnnlab import UserError
from cnnlab.domains import domain_of, leaves
from cnnlab.relations import RELATIONS


def check(cfg: DictConfig, builds: tuple[str, ...] | None = None) -> None:
    """Refuse, in one line, the first value that cannot work: its domain, its target, its relations, and whether
    the optimizer and its schedule take their settings.

    `builds`: the top-level nodes whose `_target_` the caller builds (None: all, as training does). A tool that
    only reads a node (export's `data`, for its test images) does not import what it would build: export and
    predict start without Lightning."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that cannot be resolved (${trainer.max_epoch}, say)
        raise UserError(f"the config does not resolve: {' '.join(str(err).split())}") from None
    # The keys a user sets before those that take their value from another (scheduler.T_max: ${trainer.max_epochs}),
    # so that a wrong value is refused under the key it was given to.
    given = dict(leaves(OmegaConf.to_container(cfg, resolve=False)))
    derived = {key for key, value in given.items() if isinstance(value, str) and "${" in value}
    for key, value in sorted(leaves(config), key=lambda leaf: leaf[0] in derived):
        domain = domain_of(key)
        if domain is not None and not domain.accepts(value):
            raise UserError(domain.refusal(key, value) + (f" (it is {given[key]})" if key in derived else ""))
    check_targets({key: node for key, node in config.items() if builds is None or key in builds})
    for relation in RELATIONS:
        if problem := relation(cfg):
            raise UserError(problem)
    check_optimizer(cfg)


def check_targets(config: dict, prefix: str = "") -> None:
    """Every node with a `_target_` imports, and each of its keys is a parameter of what it builds."""
    for key, node in config.items():
        if not isinstance(node, dict):
            continue
        name = f"{prefix}{key}"
        if "_target_" in node:
            try:
                target = locate(str(node["_target_"]))
            except Exception as err:
                raise UserError(f"{name}._target_={node['_target_']}: cannot be imported ({_cause(err)})") from None
            if not callable(target):
                raise UserError(f"{name}._target_={node['_target_']} is not a class or function to build")
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):  # a builtin without a signature: nothing to check its keys against
                signature = None
            if signature and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
                options = set(signature.parameters)
                unknown = sorted(k for k in node if not k.startswith("_") and k not in options)
                if unknown:
                    raise UserError(f"{name}.{unknown[0]} is not an option of {node['_target_']}; its options: "
                                    f"{', '.join(sorted(options - {'self', 'params', 'optimizer'}))}")  # fmt: skip
        check_targets(node, f"{name}.")


def locate(path: str):
    """The object a dotted path names (a `_target_`), imported as Hydra imports it: the longest importable module,
    then attributes (as hydra.utils.get_object does, which hydra-core 1.3.0 lacks)."""
    import importlib

    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for name in parts[end:]:
            found = getattr(found, name)
        return found
    raise ImportError(f"No module named '{parts[0]}'")


def check_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer and its schedule on one dummy weight: torch's own checks of their settings."""
    if cfg.get("optimizer") is None:
        return
    import torch
    from hydra.utils import instantiate

    from cnnlab.module import per_step

    weight = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = instantiate(cfg.optimizer)(params=[weight])
    except Exception as err:
        raise UserError(f"optimizer: {cfg.optimizer._target_} refuses its settings: {_cause(err)}") from None
    if cfg.get("scheduler") is None:
        return
    try:
        scheduler = instantiate(cfg.scheduler)
        scheduler(optimizer=optimizer, **({"total_steps": 1} if per_step(scheduler) else {}))
    except Exception as err:
        raise UserError(f"scheduler: {cfg.scheduler._target_} refuses its settings: {_cause(err)}") from None


def _cause(err: BaseException) -> str:
    return " ".join(str(err.__cause__ or err).split())
