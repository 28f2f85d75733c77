"""The command line `python -m comigs_jax.capacity`: a configs/capacity.py config (`users`, the
capacity keys) or any experiment config (configs/base.py: the run's users, base, model, batch and
schedule) planned, or one `error: ...` line."""
from __future__ import annotations

import os
import sys

from ml_collections import ConfigDict

from comigs_jax.capacity.measurement import format_measurement, measure
from comigs_jax.capacity.memory import PROFILES
from comigs_jax.capacity.planning import TARGETS, format_plan, plan
from comigs_jax.errors import ConfigError
from comigs_jax.model.config import REMAT

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "capacity.py")
# Where the keys of each group of configs/capacity.py are defined (unknown-key messages).
HOMES = {"": "configs/capacity.py", "model": "configs/base.py", "train": "configs/base.py", "server": "configs/base.py",
         "dp": "configs/base.py"}


def _ints(s) -> list[int]:
    return [int(x) for x in str(s).replace(" ", "").split(",") if x]


def check_config(cfg) -> None:
    """The capacity keys' checks (ConfigError, one line); the model's are engine_configs'."""
    from comigs_jax.configuration import _fail
    if not (isinstance(cfg.users, int) and cfg.users >= 1):
        _fail("users", cfg.users, "a positive integer")
    unknown = [t for t in str(cfg.targets).split(",") if t.strip() and t.strip() not in TARGETS]
    if unknown or not str(cfg.targets).strip():
        _fail("targets", cfg.targets, f"comma-separated, of {', '.join(TARGETS)}")
    if cfg.profile not in PROFILES:
        _fail("profile", cfg.profile, " | ".join(PROFILES))
    if cfg.model.remat not in REMAT:
        _fail("model.remat", cfg.model.remat, " | ".join(REMAT))
    if not 0 < cfg.mfu <= 1:
        _fail("mfu", cfg.mfu, "in (0, 1]")
    if not 0 < cfg.usable <= 1:
        _fail("usable", cfg.usable, "in (0, 1]")
    for key in ("train_tokens", "valid_tokens"):
        if not (isinstance(cfg[key], int) and cfg[key] >= cfg.train.seq_len + 1):
            _fail(key, cfg[key], f"at least one window: train.seq_len + 1 = {cfg.train.seq_len + 1}")
    try:
        users = _ints(cfg.measure)
    except ValueError:
        users = [0]
    if users and (len(users) < 2 or min(users) < 1 or len(set(users)) < 2):
        _fail("measure", cfg.measure, "'' or at least two different positive U, comma-separated (e.g. 16,64)")


def server_settings(cfg, method) -> dict:
    """plan()'s server keywords of a config for `method`: its server optimizer (the `server` group;
    None for none), `dp` (dp.enabled) and `ranked` (model.ranks set: each row holds its ranks);
    ConfigError (one line) as the experiment's checks (comigs_jax.rules, federated.privacy)."""
    from comigs_jax import rules
    from comigs_jax.configuration import _fail
    from comigs_jax.federated import privacy
    opt = rules.server_optimizer_of(cfg)
    why = rules.no_server_step(method)
    if opt is not None and why:
        _fail("server.optimizer", opt.name, f"none for method {method.name} ({why})")
    dp = cfg.dp.enabled if cfg.get("dp") is not None else False
    if not isinstance(dp, bool):
        _fail("dp.enabled", dp, "True or False")
    ranked = bool(str(cfg.model.get("ranks", "")).strip())
    if dp:
        try:
            privacy.check_method(None, method, [1] if ranked else None)
            privacy.check_shares(method, cfg.model.attn_rank, cfg.model.n_experts, cfg.model.n_generalists)
        except privacy.PrivacyError as e:
            raise ConfigError(f"config.{e}") from None
    return {"server_optimizer": opt, "dp": dp, "ranked": ranked}


def is_experiment_config(cfg) -> bool:
    """True for an experiment config (configs/base.py's groups: `data`, `federation`), False for a
    capacity config (a top-level `users`)."""
    return "users" not in cfg and "data" in cfg and "federation" in cfg


def experiment_plans(cfg, defaults: ConfigDict) -> list[ConfigDict]:
    """The capacity configs of an experiment config's runs, one per method (config.methods or
    config.method), after its own checks (comigs_jax.configuration.validate, one line): its users
    (data.n_users; x the seeds with federation.stack_seeds, one program; Centralized: one pooled
    model per federation, batch x data.n_users, every user's tokens), its base's shape (a named
    size or "pretrain", whose vocabulary is data.synthetic.vocab_size; another base is one line:
    nothing is loaded), its model (users with model.expert_counts are held at the largest count),
    batch, schedule and data.train_tokens / valid_tokens per user, its server optimizer and DP
    (the server's state per row). The capacity keys (targets, mfu, usable, profile, measure) are
    `defaults`' (configs/capacity.py's)."""
    from comigs_jax import configuration
    from comigs_jax.federated.methods import get_method
    configuration.validate(cfg)
    n_users = cfg.data.n_users
    feds = len(configuration.seeds_of(cfg)) if cfg.federation.stack_seeds else 1
    out = []
    for name in configuration.methods_of(cfg):
        pooled = get_method(name).pooled_data
        c = ConfigDict(defaults.to_dict())
        c.users, c.method, c.base = feds if pooled else feds * n_users, name, cfg.base
        c.vocab_size = cfg.data.synthetic.vocab_size if cfg.base == "pretrain" else 0
        c.pretrain, c.model, c.train = (ConfigDict(cfg[k].to_dict()) for k in ("pretrain", "model", "train"))
        if cfg.model.expert_counts:
            c.model.n_experts, c.model.expert_counts = max(configuration.expert_counts_of(cfg)), ""
        for group in ("server", "dp"):  # the server's state per row (a config without the group: none)
            if cfg.get(group) is not None:
                c[group] = ConfigDict(cfg[group].to_dict())
        # model.ranks stays: the state is held at the padded rank model.rank, and each row holds its ranks
        scale = n_users if pooled else 1
        c.train.batch_size *= scale
        c.train_tokens, c.valid_tokens = scale * cfg.data.train_tokens, scale * cfg.data.valid_tokens
        out.append(c)
    return out


def run(cfg) -> dict:
    """The plan of a configs/capacity.py config (and its measurement with cfg.measure), printed."""
    from comigs_jax.configuration import engine_configs
    check_config(cfg)
    model_cfg, tc, method = engine_configs(cfg)
    server = server_settings(cfg, method)
    chunk = cfg.train.get("user_chunk", 0)
    p = plan(model_cfg, tc, method, cfg.users, train_tokens=cfg.train_tokens, valid_tokens=cfg.valid_tokens,
             targets=[t.strip() for t in cfg.targets.split(",") if t.strip()], mfu=cfg.mfu,
             usable_fraction=cfg.usable, profile=cfg.profile, user_chunk=chunk, **server)
    print(format_plan(p), end="")
    users = _ints(cfg.measure)
    if users:
        m = measure(model_cfg, tc, method, users, profile=cfg.profile, user_chunk=chunk, server=server,
                    train_tokens=cfg.train_tokens,
                    valid_tokens=cfg.valid_tokens, token_dtype="uint16" if model_cfg.vocab_size <= 2**16 else "int32")
        print(format_measurement(m, users), end="")
        p["measurement"] = m
    return p


def run_any(cfg) -> list[dict]:
    """The plans of a capacity config (one) or of an experiment config (one per method), printed in
    order; ConfigError (one line) for a config that is neither, or a value that is not allowed."""
    from comigs_jax import cli
    from comigs_jax.configuration import engine_configs
    if "users" in cfg:
        return [run(cfg)]
    if not is_experiment_config(cfg):
        raise ConfigError("this config is neither a capacity config (a top-level `users`, configs/capacity.py) "
                          "nor an experiment config (`data.n_users`, configs/base.py)")
    configs = experiment_plans(cfg, cli.load_config_file(DEFAULT_CONFIG))  # every check before any output
    for c in configs:
        check_config(c)
        server_settings(c, engine_configs(c)[2])
    return [run(c) for c in configs]


def _homes(argv) -> dict:
    """Where the keys of the named config file are defined: configs/capacity.py's groups for a
    capacity config, the experiment configs' otherwise (unknown-key messages)."""
    from comigs_jax import cli
    try:
        plain = cli.load_config_file(cli.config_spec(argv[1:], DEFAULT_CONFIG))
    except Exception:  # noqa: BLE001 - parse_config reports a config file that cannot be loaded
        return HOMES
    return HOMES if "users" in plain else cli.EXPERIMENT_HOMES


def main(argv=None) -> int:
    """The command line `python -m comigs_jax.capacity [--config=FILE[:ARG]] [--config.key=value ...]`
    (argv[0] is the program); its exit code. Errors are one `error: ...` line on stderr."""
    from comigs_jax import capacity, cli
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg, _ = cli.parse_config(argv, DEFAULT_CONFIG, homes=_homes(argv), doc=capacity.__doc__)
        run_any(cfg)

    return cli.main_guard(body)


def console() -> int:
    """The console script `comigs-capacity` (setup.cfg): `main` in its own process."""
    from comigs_jax import cli
    cli.install_process_hooks()
    return main()
