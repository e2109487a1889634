"""The configuration: defaults, TOML, --set, every value rule and choice list, and saved runs' configs.

Every default lives in configs/default.toml; a config file or a --set override lists only
what differs. VALUE_RULES below is the one table of what each value may be (ranges,
sizes, and the choice lists of every named setting), checked as a config is merged, so
that a mistake is one line at load time and never a failure deep in a run. The few rules
that relate two keys of a section (SECTION_RULES) are checked once the whole config is
loaded. saved_config is the one reader of a run's config.toml: every script that starts
from a saved run reads it through it.

This module imports TensorFlow nowhere, so --help and a config mistake stay fast.
"""
import json
import math
import os
import sys
import tomllib
from pathlib import Path

import common
import datasets
from common import PROJECT_DIR, UserError, shown


DEFAULT_CONFIG_PATH = PROJECT_DIR / "configs" / "default.toml"

# ------------------------------------------------------------------- the choice lists

# data.dataset: datasets.DATASETS, the datasets datasets.load_dataset can download.
SCHEDULES = ("constant", "cosine", "one_cycle")  # train.schedule (proc_mnist.learning_rate_schedule)
STRATEGIES = ("none", "mirrored", "multi_worker")  # train.distribute (distributed.make_strategy)
XLA_SETTINGS = ("auto", "on", "off")  # train.xla (distributed.use_xla)
# bfloat16 keeps float32's exponent range, so no loss scaling is needed (float16 would
# need a loss-scale optimizer whose skipped steps our non-finite check would stop on).
PRECISION_POLICIES = ("none", "mixed_bfloat16")
PRECISION_SETTINGS = (*PRECISION_POLICIES, "auto")  # train.mixed_precision; cnn.resolve_precision turns "auto" into a policy
BACKWORK_LOSSES = ("probability", "log_probability", "margin")  # backwork.loss (backwork_cost.label_loss)
ATTACKS = BACKWORK_LOSSES + ("pgd", "square", "transfer")  # augment.attacks (attacks.py)
DEFENCE_TERMS = ("outlier_exposure", "acet", "good", "prood")  # the defences that train with a loss term (defences.py)
DEFENCE_METHODS = ("none", *DEFENCE_TERMS)  # defence.method (proc_mnist.py)
OUTLIER_SOURCES = ("photos", "letters", "noise")  # defence.outlier_sources (defences.outlier_pool)
DEFENCES = ("uniform", "extra_class", "control", *DEFENCE_TERMS)  # augment.target (preprocess_data.py)
EVALUATED_ROUNDS = ("every", "final")  # augment.evaluate_rounds: which of a study's models are judged
EVALUATION_SETS = ("uniform", "letters", "ood")  # evaluation.sets (evaluation.ball_points)
NOISE_FAMILIES = ("uniform", "dim", "low_frequency", "gaussian", "permuted")  # evaluation.noise_families (ood_sets.py)
SALIENCY_METHODS = ("vanilla", "guided", "both")  # saliency.method (guided_backprop.py)
SIGNS = ("positive", "negative", "both")  # saliency.sign (guided_backprop.salient_features)
SCALES = ("normalize", "binary", "none")  # saliency.scale (guided_backprop.salient_features)

# Keys whose value may be one number or a list of them (cnn.build_model normalises them).
SCALAR_OR_LIST_KEYS = {"model.num_fc_units", "model.image_dim_size"}

# The [train] keys added after the original recipe, with the values that reproduce it: a
# saved config.toml without one of them was trained with this value (saved_config).
ORIGINAL_RECIPE = {"schedule": "constant", "warmup_steps": 0, "label_smoothing": 0.0, "shift_pixels": 0, "flip": False}

# ------------------------------------------------------------------- reading TOML

MAX_CONFIG_BYTES = 1 << 20  # A config lists a few dozen values; configs/default.toml is 10 KB.
CONFIG_FIX = "give the path of a .toml file such as configs/small.toml"


def _parse_toml(text, source, fix):
    """tomllib.loads(text), or one line naming source: also for what tomllib leaves to Python (a
    number of more digits than int() takes, arrays nested deeper than the recursion limit)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{source} is not valid TOML ({common.shortened(str(error), 200)}); {fix}") from None
    except ValueError:  # int()'s limit, sys.get_int_max_str_digits()
        raise UserError(f"{source} holds a number of more than {sys.get_int_max_str_digits()} digits, which "
                        f"no config value is; {fix}") from None
    except RecursionError:
        raise UserError(f"{source} nests arrays or tables deeper than Python can read; {fix}") from None


def read_toml(path):
    data = common.read_input(path, "config", CONFIG_FIX, MAX_CONFIG_BYTES)
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        raise UserError(f"config {common.shown_path(path)} is not valid TOML ({error}); fix that line") from None
    return _parse_toml(text, f"config {common.shown_path(path)}", "fix that line")


def default_config():
    """The defaults of every script, read from configs/default.toml (the one place they live)."""
    return read_toml(DEFAULT_CONFIG_PATH)


def _shown_value(value, limit=80):
    """A config value as a message shows it: its repr where that is short (and Python can write it: not
    an int of 5,000 digits, not arrays nested 900 deep), else common.shown's few words."""
    if isinstance(value, (list, dict)) and len(value) <= limit:
        try:
            text = repr(value)
        except (ValueError, RecursionError):
            text = ""
        if 0 < len(text) <= limit:
            return text
    return shown(value, limit)


def _checked_value(name, default, value):
    """Return value if it has the default's type (ints are accepted for floats)."""
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif type(value) is type(default):
        return value
    elif name in SCALAR_OR_LIST_KEYS and isinstance(value, (int, list)):
        return value
    raise UserError(
        f"config key {name} must be a {type(default).__name__} like the default {default!r}, "
        f"not {_shown_value(value)}; fix it in the config or the --set override")



# ------------------------------------------------------------------- the rules

_STANDARD_MESSAGE = "{source}: {name} = {value} must be {description}; fix it in the config or --set"


def _rule(test, description, message=None):
    """A value rule: test(value) is true for a valid value; description and message say what is valid."""
    return test, description, message or _STANDARD_MESSAGE


def _between(low, high):
    return _rule(lambda value: low <= value <= high, f"between {low} and {high}")


_POSITIVE = _rule(lambda value: value > 0, "greater than 0")
_AT_LEAST_ZERO = _rule(lambda value: value >= 0, "0 or more")
_PROBABILITY = _rule(lambda value: 0 < value <= 1, "in (0, 1]")
_SEED = _between(0, 2**31 - 1)
_COUNT = _between(1, 10**9)


def _tables(maximum_count, none_means="not allowed"):
    def test(items):
        allowed = (dict,) if none_means == "not allowed" else (dict, type(None))
        return len(items) <= maximum_count and all(isinstance(item, allowed) for item in items)

    return _rule(test, f"a list of at most {maximum_count} tables like {{filter = [...], strides = [...], "
                       f"padding = ...}} ({{}} or None: {none_means})")


def _sizes(maximum):
    def test(value):
        values = value if isinstance(value, list) else [value]
        return all(isinstance(item, int) and 1 <= item <= maximum for item in values)

    return _rule(test, f"one or more sizes between 1 and {maximum}")


# What each numeric or structured config value may be; checked wherever a config is merged,

def _one_of(choices, message="{name} {value} is unknown; use one of {description}"):
    """A named setting: one of choices (the message says which exist)."""
    return _rule(lambda value: value in choices, ", ".join(choices), message)


_SALIENCY_MESSAGE = "{name} must be one of {description}; fix the flag, the config or --set"

VALUE_RULES = {
    "data.validation_size": _AT_LEAST_ZERO,
    "data.dataset": _rule(lambda name: name in datasets.DATASETS or name == "",
                          f"one of {', '.join(datasets.DATASETS)} (or give --data PATH)"),
    "data.sha256": _rule(lambda text: text == "" or (len(text) == 64 and set(text) <= set("0123456789abcdef")),
                         "\"\" or 64 lowercase hexadecimal digits"),
    "model.image_dim_size": _sizes(4096),
    "model.num_classes": _between(2, 100_000),
    "model.conv_layers": _tables(64),
    "model.pool_layers": _tables(64, none_means="no pooling"),
    "model.num_fc_units": _sizes(65_536),
    "model.dropout": _rule(lambda value: 0 <= value < 1, "in [0, 1)"),
    "train.learning_rate": _POSITIVE,
    "train.batch_size": _between(1, 100_000),
    "train.num_steps": _COUNT,
    "train.log_every": _COUNT,
    "train.seed": _SEED,
    "train.warmup_steps": _between(0, 10**9),
    "train.label_smoothing": _rule(lambda value: 0 <= value < 1, "in [0, 1)"),
    "train.shift_pixels": _between(0, 1000),
    "train.schedule": _one_of(SCHEDULES),
    "train.distribute": _one_of(STRATEGIES),
    "train.xla": _one_of(XLA_SETTINGS),
    "train.mixed_precision": _one_of(PRECISION_SETTINGS),
    "backwork.num_examples": _between(1, 100_000),
    "backwork.learning_rate": _POSITIVE,
    "backwork.max_num_steps": _COUNT,
    "backwork.min_num_steps": _between(0, 10**9),
    "backwork.tolerance": _AT_LEAST_ZERO,
    "backwork.prob_cap_mean": _PROBABILITY,
    "backwork.prob_cap_min": _PROBABILITY,
    "backwork.save_freq": _COUNT,
    "backwork.num_mono_dec_saves": _COUNT,
    "backwork.reinit_below": _between(0, 1),
    "backwork.reference_cost_coeff": _AT_LEAST_ZERO,
    "backwork.batch_cost_coeff": _AT_LEAST_ZERO,
    "backwork.max_reference_examples": _between(0, 10**9),
    "backwork.nearest_every": _COUNT,
    "backwork.layer_cost_coeffs": _rule(
        lambda values: all(isinstance(value, (int, float)) and math.isfinite(value) for value in values),
        "a list of finite numbers ([] for the default)"),
    "backwork.seed": _SEED,
    "backwork.loss": _rule(lambda name: name in BACKWORK_LOSSES, f"one of {', '.join(BACKWORK_LOSSES)}"),
    "backwork.margin_kappa": _POSITIVE,
    "augment.num_blank": _between(0, 1_000_000),
    "augment.num_noise": _between(0, 1_000_000),
    "augment.retrain_steps": _COUNT,
    "augment.rounds": _between(1, 1000),
    "augment.num_eval_noise": _between(1, 1_000_000),
    "augment.seed": _SEED,
    "augment.heldout_seed": _SEED,
    "augment.target": _rule(lambda name: name in DEFENCES, f"one of {', '.join(DEFENCES)}"),
    "augment.attacks": _rule(lambda names: 0 < len(names) and set(names) <= set(ATTACKS)
                             and len(set(names)) == len(names), f"a list of distinct names from {', '.join(ATTACKS)}"),
    "augment.train_on": _rule(lambda name: name in ("strongest",) + BACKWORK_LOSSES,
                              f"\"strongest\" or one of {', '.join(BACKWORK_LOSSES)}"),
    "augment.attack_examples": _between(1, 10_000),
    "augment.evaluate_rounds": _one_of(EVALUATED_ROUNDS),
    "evaluation.eps": _rule(lambda value: 0 < value <= 1, "in (0, 1] (pixels lie in [0, 1]; 0.3 for 28x28 grey images)"),
    "evaluation.points": _between(1, 1_000_000),
    "evaluation.sets": _rule(lambda names: 0 < len(names) and set(names) <= set(EVALUATION_SETS)
                             and len(set(names)) == len(names), f"a list of distinct ones of {', '.join(EVALUATION_SETS)}"),
    "evaluation.starts_per_class": _between(1, 100_000),
    "evaluation.noise_families": _rule(lambda names: 0 < len(names) and set(names) <= set(NOISE_FAMILIES)
                                       and len(set(names)) == len(names),
                                       f"a list of distinct ones of {', '.join(NOISE_FAMILIES)}"),
    "evaluation.apgd_steps": _between(1, 100_000),
    "evaluation.apgd_restarts": _between(1, 100),
    "evaluation.square_points": _between(0, 1_000_000),
    "evaluation.square_starts_per_class": _between(0, 100_000),
    "evaluation.square_queries": _between(1, 10**7),
    "evaluation.novelty_quantile": _PROBABILITY,
    "evaluation.novelty_test_points": _between(1, 10**7),
    "evaluation.art_check_points": _between(1, 100_000),
    "evaluation.batch_size": _between(1, 100_000),
    "evaluation.seed": _SEED,
    "augment.pgd_steps": _COUNT,
    "augment.pgd_step_size": _POSITIVE,
    "augment.square_queries": _between(1, 10**7),
    "augment.difficulty_budgets": _rule(
        lambda budgets: 0 < len(budgets) <= 20 and all(isinstance(b, int) and b >= 1 for b in budgets)
        and budgets == sorted(set(budgets)), "an increasing list of 1 to 20 step counts, each at least 1"),
    "defence.method": _one_of(DEFENCE_METHODS),
    "defence.outlier_exposure_weight": _AT_LEAST_ZERO,
    "defence.acet_weight": _AT_LEAST_ZERO,
    "defence.good_weight": _AT_LEAST_ZERO,
    "defence.prood_weight": _AT_LEAST_ZERO,
    "defence.outlier_batch": _between(1, 100_000),
    "defence.outlier_sources": _rule(lambda names: 0 < len(names) and set(names) <= set(OUTLIER_SOURCES)
                                     and len(set(names)) == len(names),
                                     f"a list of distinct names from {', '.join(OUTLIER_SOURCES)}"),
    "defence.eps": _PROBABILITY,
    "defence.attack_steps": _between(1, 10_000),
    "defence.attack_step_size": _POSITIVE,
    "defence.ramp_fraction": _between(0, 1),
    "defence.certified_fraction": _between(0, 1),
    "defence.box_attack_fraction": _between(0, 1),
    "defence.seed": _SEED,
    "saliency.num": _between(1, 100_000),
    "saliency.label": _rule(lambda value: value >= -1, "a class (0 or more), or -1 for the predicted class"),
    "saliency.smooth_samples": _between(0, 100_000),
    "saliency.smooth_noise": _AT_LEAST_ZERO,
    "saliency.seed": _SEED,
    "saliency.top_k": _AT_LEAST_ZERO,
    "saliency.method": _one_of(SALIENCY_METHODS, _SALIENCY_MESSAGE),
    "saliency.sign": _one_of(SIGNS, _SALIENCY_MESSAGE),
    "saliency.scale": _one_of(SCALES, _SALIENCY_MESSAGE),
}


def _warmup_before_the_end(section):
    if not section["warmup_steps"] < section["num_steps"]:
        raise UserError(f"train.warmup_steps {section['warmup_steps']} must be below "
                        f"train.num_steps ({section['num_steps']})")


# The rules that relate two keys of one section, checked once the whole config is loaded
# (an override may change either key, in any order).
SECTION_RULES = {"train": [_warmup_before_the_end]}


def _check_rule(name, value, source):
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{source}: {name} = {value!r} must be a finite number; fix it in the config or --set")
    test, description, message = VALUE_RULES.get(name, (None, None, None))
    if test is not None and not test(value):
        raise UserError(message.format(source=source, name=name, value=_shown_value(value), description=description))


def check_section(section, values, source):
    """Check one section (a dict a notebook built, say): every value against VALUE_RULES, then SECTION_RULES.

    A partial section (a notebook's) is checked for the keys it has; the rules relating two
    keys need both.
    """
    for key, value in values.items():
        _check_rule(f"{section}.{key}", value, source)
    for rule in SECTION_RULES.get(section, []):
        try:
            rule(values)
        except KeyError:  # A partial section without one of the rule's keys.
            pass


def check_config(config):
    """The rules relating two keys of a section, for a whole config whose values were merged."""
    for section, rules in SECTION_RULES.items():
        for rule in rules:
            rule(config[section])
    return config


# ------------------------------------------------------------------- merging


def merge_config(config, updates, source):
    """Overlay updates onto config in place; unknown keys, wrong types and values out of range are errors."""
    for section, values in updates.items():
        if section not in config or not isinstance(values, dict):
            known = ", ".join(f"[{name}]" for name in config)
            raise UserError(f"{source}: unknown section [{common.shortened(str(section), 60)}]; "
                            f"the sections are {known}")
        for key, value in values.items():
            if key not in config[section]:
                known = ", ".join(sorted(config[section]))
                raise UserError(f"{source}: unknown key {section}.{common.shortened(str(key), 60)}; "
                                f"keys of [{section}] are {known}")
            value = _checked_value(f"{section}.{key}", config[section][key], value)
            _check_rule(f"{section}.{key}", value, source)
            config[section][key] = value
    return config


def parse_override(text):
    """'train.learning_rate=3e-4' -> {'train': {'learning_rate': 3e-4}} with TOML value syntax."""
    name, separator, raw_value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not separator or not dot or not key:
        raise UserError(f"--set {shown(text)} must look like section.key=value, e.g. train.learning_rate=3e-4")
    try:
        value = tomllib.loads(f"value = {raw_value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()  # A bare word such as relu or SAME is meant as a string.
    except (ValueError, RecursionError):  # What tomllib leaves to Python: _parse_toml says which.
        source = f"--set {shown(text)}"
        value = _parse_toml(f"value = {raw_value.strip()}", source, "give a value a config can hold")["value"]
    return {section: {key: value}}



def load_config(path=None, overrides=(), base=None):
    """Defaults (or base), then the config file, then each --set override, strictly checked."""
    config = base if base is not None else default_config()
    if path is not None:
        merge_config(config, read_toml(path), source=common.shown_path(path))
    for override in overrides:
        merge_config(config, parse_override(override), source=f"--set {override}")
    return check_config(config)


def complete_config(config, source="options"):
    """A (possibly partial) config dict a notebook gives, filled from the defaults and checked."""
    return check_config(merge_config(default_config(), config or {}, source=source))


def add_common_arguments(parser, section):
    """Arguments every script takes: a config, overrides, the data and the seed."""
    parser.add_argument("config", nargs="?", help="TOML config listing what differs from configs/default.toml")
    parser.add_argument("--data", help="local .npz in the Keras layout (default: $DATA_PATH, $MNIST_PATH for MNIST, "
                                       "else download [data] dataset)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; may be repeated")
    parser.add_argument("--seed", type=int, help=f"random seed (overrides {section}.seed)")
    parser.add_argument("--allow-other-data", action="store_true",
                        help="go on although the data is not the one the model was trained on (its config.toml "
                             "says which); reported, and recorded in what is written")


def resolve_cli_config(args, section, base=None, flags=None):
    """The config a script runs with: defaults (or base), the config file, --set, then the command's own
    flags ({section: {key: value}}, None values left out) and --seed as config values, each checked as merged."""
    config = load_config(args.config, args.set, base=base)
    flags = {name: dict(values) for name, values in (flags or {}).items()}
    if args.seed is not None:
        flags.setdefault(section, {})["seed"] = args.seed
    given = {name: {key: value for key, value in values.items() if value is not None} for name, values in flags.items()}
    return check_config(merge_config(config, given, source="command line"))



# ------------------------------------------------------------------- saved runs


def saved_config(path):
    """The config a run saved (its config.toml), as the run used it: the one reader of a saved config.

    A config.toml written before a [train] key of the recipe existed gets that key's
    original value (ORIGINAL_RECIPE), not today's default: a model trained on the original
    recipe is resumed and retrained on it.
    """
    saved_train = read_toml(path).get("train", {})
    config = load_config(path)
    config["train"].update({key: value for key, value in ORIGINAL_RECIPE.items() if key not in saved_train})
    return check_config(config)


def model_data_config(model_path):
    """The defaults with the [data] section of the config the model was trained with (its config.toml),
    so that a CIFAR model is backworked and explained on CIFAR without naming the config again."""
    config, trained_with = default_config(), Path(model_path).parent / "config.toml"
    if os.path.isfile(trained_with):  # Never raises (a name too long): check_model_file says what is wrong.
        config["data"] = saved_config(trained_with)["data"]
    return config


def load_data(args, config):
    """The data a script runs on: --data, else data.file, else $DATA_PATH / $MNIST_PATH, else the download."""
    section = config["data"]
    return datasets.load_dataset(args.data, section["dataset"], section["file"])


def model_data_record(model_path):
    """What the model beside this config.toml was trained on, as a provenance record, or None.

    From its config.toml's [data] (file and sha256 written since they exist), else the "data" of the
    metrics.json or report.json beside it (older runs), else its config's dataset name.
    """
    folder = Path(model_path).parent
    section = saved_config(folder / "config.toml")["data"] if os.path.isfile(folder / "config.toml") else None
    if section is not None and (section["file"] or section["sha256"]):
        return {"dataset": section["dataset"] or None, "file": section["file"] or None,
                "sha256": section["sha256"] or None, "download": not section["file"]}
    for name in ("metrics.json", "report.json"):
        if not os.path.isfile(folder / name):
            continue
        try:
            recorded = json.loads(common.read_input(folder / name, name, "", 1 << 28)).get("data")
        except (ValueError, AttributeError, RecursionError):  # UserError too: an unreadable record is no record.
            continue
        fields = ("dataset", "file", "sha256")
        if isinstance(recorded, dict) and all(isinstance(recorded.get(key), (str, type(None))) for key in fields):
            return {"dataset": None, "file": None, "sha256": None, **recorded}
    if section is not None and section["dataset"]:
        return {"dataset": section["dataset"], "file": None, "sha256": None, "download": True}
    return None


def check_model_data(model_path, provenance, allow_other=False, what="the data",
                     fix="give the model's data (--data PATH) or another model"):
    """The provenance to record for data used with the model at model_path: refused in one line where it
    is not the data the model was trained on (unless allow_other: then noted, and the record says so
    under "model_data"). A local file with the model's sha256 takes the model's dataset name."""
    recorded = model_data_record(model_path)
    if recorded is None or provenance is None:
        return provenance
    if datasets.same_data(recorded, provenance):
        name = provenance.get("dataset") or datasets.provenance_dataset(recorded)
        return {**provenance, "dataset": name}
    given, trained = datasets.describe_data(provenance), datasets.describe_data(recorded)
    if not allow_other:
        raise UserError(f"model {model_path} was trained on {trained}, but {what} is {given}; {fix}, "
                        "or pass --allow-other-data to go on anyway")
    print(f"note: --allow-other-data: model {model_path} was trained on {trained}; going on with {given}")
    return {**provenance, "model_data": recorded}


def with_data_record(config, provenance):
    """config with its [data] naming the data actually used (dataset, file, sha256), to be saved."""
    if not provenance:
        return config
    record = {"dataset": datasets.provenance_dataset(provenance) or "", "sha256": provenance.get("sha256") or "",
              "file": "" if datasets.downloaded(provenance) else str(provenance["file"])}
    return {**config, "data": {**config["data"], **record}}


def save_run_config(path, config, provenance):
    """Write a run's config.toml (atomically): config with [data] naming the data actually used, headed
    by a comment line that says what was read. Training and the study both write theirs here."""
    import common

    config = with_data_record(config, provenance)
    text = datasets.provenance_comment(provenance) + dump_toml(config)
    common.atomic_write_bytes(path, text.encode())


# ------------------------------------------------------------------- writing TOML


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # JSON numbers and strings are valid TOML.
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    if callable(value):
        return json.dumps(getattr(value, "__name__", repr(value)))
    if value is None:
        return "{}"  # TOML has no null; an empty table is our "none" (no pooling layer).
    raise TypeError(f"cannot write {value!r} to TOML")


def dump_toml(config):
    """Write a resolved config as TOML, so that a run's config.toml can be passed back in."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)

