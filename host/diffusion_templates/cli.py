"""The ``dt`` command line: list, inspect and check plugins; run the demo; extension commands.

``dt list`` reads installed package metadata only: it imports no plugin, torch or diffusers, so it
answers in a fraction of a second. ``dt info`` imports the one plugin asked about; ``dt doctor``
imports them all and reports every problem, naming the plugin, its distribution and the reason.

Any installed distribution can add subcommands through the entry point group
``diffusion_templates.commands``: each entry point names a function ``register(subparsers)`` that
adds its parser(s) with ``subparsers.add_parser(...)`` and sets ``func=`` through
``set_defaults``; ``func(args)`` returns an exit code (or None for 0). These are loaded only when
the command asked for is not a built-in one, so ``dt list`` stays fast. Set ``DT_TRACEBACK=1`` to
see the traceback of a failing extension command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__
from .errors import PluginError, TemplateError

COMMANDS_GROUP = "diffusion_templates.commands"
KINDS = ("template", "carrier", "backbone")
BUILTIN_COMMANDS = ("list", "info", "doctor", "demo", "generate")
HOST_DISTRIBUTION = "diffusion-templates"
#: ``dt list`` also lists base models (``diffusion_templates.base_models``, e.g. ``dt-base-shapes``).
BASE_KIND = "base"
BASE_MODELS_GROUP = "diffusion_templates.base_models"


class UsageError(Exception):
    """A bad command line or job file: ``dt: error: ...`` and exit code 2, argparse's convention."""


def positive_int(text: str) -> int:
    """An argparse ``type`` for ``--steps`` and ``--size``: 0 steps or a 0-pixel image is a mistake."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


# -- small helpers ------------------------------------------------------------------------------------
def _err(message: str) -> None:
    print(f"dt: error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"dt: warning: {message}", file=sys.stderr)


def _joined(values: Sequence[str], empty: str = "-") -> str:
    return ", ".join(values) if values else empty


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def _sort_key(info: Any) -> tuple[int, str, str]:
    return (KINDS.index(info.kind) if info.kind in KINDS else len(KINDS), info.name, info.distribution)


def _where(kind: str, name: str, distribution: str, version: str) -> str:
    version = f" {version}" if version else ""
    return f"{kind} {name!r} (distribution {distribution}{version})"


# -- dt list ---------------------------------------------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    from .plugins import discover  # metadata only: imports no plugin, torch or diffusers

    infos = sorted((i for i in discover() if args.kind in (None, i.kind)), key=_sort_key)
    bases = _base_models() if args.kind in (None, BASE_KIND) else []
    if args.json:
        # Plain --json stays the list of plugins (what scripts read; DT_LOAD/DISABLE_PLUGINS apply to
        # them, not to base models): the base models come with --kind base.
        print(json.dumps(bases if args.kind == BASE_KIND else [i.as_dict() for i in infos], indent=2))
        return 0
    if not infos and not bases:
        print(f"no {args.kind or 'plugin'}s installed")
        return 0
    headers = ("KIND", "NAME", "VERSION", "DISTRIBUTION", "CARRIERS", "BACKBONES", "STATUS", "PROBLEM")
    rows = [
        (
            i.kind,
            i.name,
            i.version or "-",
            i.distribution,
            _joined(i.carriers),
            _joined(i.backbones),
            i.status,
            i.problem or "",
        )
        for i in infos
    ]
    rows += [
        (BASE_KIND, b["name"], b["version"] or "-", b["distribution"], "-", "-", b["status"], b["problem"])
        for b in bases
    ]
    print(_table(headers, rows))
    return 0


def _base_models() -> list[dict[str, str]]:
    """The installed base models (what ``dt generate`` uses without ``--base``), from metadata alone."""
    from .installed import entries

    return [
        {
            "kind": BASE_KIND,
            "name": e.name,
            "version": e.dist.version or "",
            "distribution": e.dist.name,
            "value": e.value,
            "status": "broken" if e.problem is not None else "available",
            "problem": e.problem or "",
        }
        for e in entries([BASE_MODELS_GROUP])
    ]


# -- dt info ---------------------------------------------------------------------------------------------
def _first_paragraph(text: str | None) -> str:
    import inspect

    if not text:
        return ""
    paragraph = inspect.cleandoc(text).split("\n\n", 1)[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def _description(obj: Any) -> str:
    """The plugin's own docstring (not an inherited base-class one), else its module's."""
    import inspect

    if inspect.ismodule(obj):
        return _first_paragraph(obj.__doc__)
    cls = obj if inspect.isclass(obj) else type(obj)
    own = cls.__dict__.get("__doc__")
    if own:
        return _first_paragraph(own)
    module = sys.modules.get(cls.__module__)
    return _first_paragraph(getattr(module, "__doc__", None))


def _type_name(tp: Any) -> str:
    if tp is None:
        return "Any"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _constraints(field: Any) -> list[str]:
    import dataclasses

    out = []
    for item in field.metadata:
        if dataclasses.is_dataclass(item):
            pairs = [(f.name, getattr(item, f.name)) for f in dataclasses.fields(item)]
        elif hasattr(item, "__dict__"):
            pairs = list(vars(item).items())
        else:
            pairs = [(type(item).__name__, item)]
        out.extend(f"{key}={value!r}" for key, value in pairs if value is not None)
    return out


def _input_fields(model: type) -> list[dict[str, Any]]:
    """The fields of a pydantic model, as a person reads them: type, default, constraints, description."""
    fields = []
    for name, field in model.model_fields.items():
        if field.is_required():
            default = None
        elif field.default_factory is not None:
            default = f"{getattr(field.default_factory, '__name__', 'factory')}()"
        else:
            default = repr(field.default)
        fields.append(
            {
                "name": field.alias or name,
                "type": _type_name(field.annotation),
                "required": field.is_required(),
                "default": default,
                "constraints": _constraints(field),
                "description": field.description or "",
            }
        )
    return fields


def _json_schema(model: type) -> dict[str, Any]:
    """``model_json_schema()``; a field with no JSON form (a tensor, say) is described, not fatal."""
    import warnings

    from pydantic.json_schema import GenerateJsonSchema

    class Lenient(GenerateJsonSchema):
        def handle_invalid_for_json_schema(self, schema: Any, error_info: str) -> dict[str, Any]:
            return {"description": f"not representable in JSON Schema: {error_info}"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # defaults that are not JSON-serialisable are left out
        return model.model_json_schema(schema_generator=Lenient)


def _backbone_adapters(host: Any) -> dict[str, Any]:
    adapters = {}
    for name in host.names("backbone"):
        try:
            adapters[name] = host.get("backbone", name)
        except PluginError:
            continue
    return adapters


def _supports(host: Any, carrier: str, adapter: Any) -> bool:
    """Ask the carrier (a plugin carrier decides for itself; the adapter's list is only the default)."""
    try:
        return bool(host.get("carrier", carrier).supports(adapter))
    except Exception:
        return False


def _common(info: Any, obj: Any) -> dict[str, Any]:
    own = info.distribution.lower() == HOST_DISTRIBUTION
    return {
        "kind": info.kind,
        "name": info.name,
        "description": _description(obj),
        "version": info.version,
        "distribution": info.distribution,
        "entry_point": info.value,
        "host_requires": "(part of the host)" if own else info.host_requires,
        "status": info.status,
    }


def _describe_template(host: Any, info: Any, obj: Any) -> dict[str, Any]:
    carriers = [str(c) for c in getattr(obj, "carriers", ()) or ()]
    backbones = [str(b) for b in getattr(obj, "backbones", ("*",)) or ()]
    compatible = [
        name
        for name, adapter in _backbone_adapters(host).items()
        if ("*" in backbones or name in backbones)
        and all(_supports(host, carrier, adapter) for carrier in carriers)
    ]
    inputs = obj.Inputs
    return {
        **_common(info, obj),
        "carriers": carriers,
        "backbones": backbones,
        "compatible_backbones": compatible,
        "metadata": {"carriers": list(info.carriers), "backbones": list(info.backbones)},
        "inputs_model": f"{inputs.__module__}.{inputs.__qualname__}",
        "inputs_schema": _json_schema(inputs),
    }


def _describe_carrier(host: Any, info: Any, obj: Any) -> dict[str, Any]:
    cache_class = getattr(obj, "cache_class", None)
    fields = []
    if cache_class is not None and hasattr(cache_class, "model_fields"):
        fields = [{k: v for k, v in f.items() if k != "constraints"} for f in _input_fields(cache_class)]
    supported = [
        name for name, adapter in _backbone_adapters(host).items() if _supports(host, info.name, adapter)
    ]
    templates = sorted(i.name for i in host.infos if i.kind == "template" and info.name in i.carriers)
    return {
        **_common(info, obj),
        "cache_class": f"{cache_class.__module__}.{cache_class.__qualname__}" if cache_class else None,
        "cache_fields": fields,
        "backbones": supported,
        "templates": templates,
    }


def _describe_backbone(host: Any, info: Any, obj: Any) -> dict[str, Any]:
    described = obj.describe() if hasattr(obj, "describe") else {}
    templates = sorted(i.name for i in host.infos if i.kind == "template" and info.name in i.backbones)
    return {**_common(info, obj), "describe": described, "templates": templates}


def _print_info(data: dict[str, Any], obj: Any) -> None:
    print(f"{data['name']}  ({data['kind']})")
    if data["description"]:
        print(f"  {data['description']}")
    print()
    rows: list[tuple[str, str]] = [
        ("version", data["version"] or "-"),
        ("distribution", data["distribution"]),
        ("entry point", data["entry_point"]),
        ("host", data["host_requires"] or "any version"),
    ]
    kind = data["kind"]
    if kind == "template":
        declared = data["backbones"]
        rows += [
            ("carriers", _joined(data["carriers"], "none")),
            ("backbones", "any (*)" if "*" in declared else _joined(declared, "none")),
            ("compatible", _joined(data["compatible_backbones"], "no installed backbone")),
        ]
    elif kind == "carrier":
        rows += [
            ("cache class", data["cache_class"] or "-"),
            ("backbones", _joined(data["backbones"], "no installed backbone supports it")),
            ("templates", _joined(data["templates"], "none installed")),
        ]
    else:
        for key, value in data["describe"].items():
            text = _joined([str(v) for v in value]) if isinstance(value, list | tuple) else str(value)
            rows.append((key, text))
        rows.append(("templates", _joined(data["templates"], "none declare it")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    if kind == "template":
        _print_fields(f"inputs ({obj.Inputs.__name__})", _input_fields(obj.Inputs))
    elif kind == "carrier" and data["cache_fields"]:
        _print_fields("cache fields", data["cache_fields"])


def _print_fields(title: str, fields: list[dict[str, Any]]) -> None:
    print(f"\n{title}:")
    if not fields:
        print("  (no fields)")
    for f in fields:
        line = f"  {f['name']}: {f['type']}"
        line += "  (required)" if f["required"] else f" = {f['default']}"
        if f.get("constraints"):
            line += f"  [{', '.join(f['constraints'])}]"
        print(line)
        if f["description"]:
            print(f"      {f['description']}")


def _cmd_info(args: argparse.Namespace) -> int:
    from .errors import UnknownTemplateError
    from .plugins import PluginHost

    host = PluginHost()
    kinds = [args.kind] if args.kind else list(KINDS)
    matches = [kind for kind in kinds if host.info(kind, args.name) is not None]
    if not matches:
        available = "; ".join(f"{kind}s: {_joined(host.names(kind), 'none')}" for kind in kinds)
        what = args.kind or "plugin"
        error = UnknownTemplateError if args.kind in (None, "template") else PluginError
        raise error(f"no {what} named {args.name!r} is installed (available {available})")
    kind = matches[0]
    if len(matches) > 1:
        _warn(f"{args.name!r} names a {' and a '.join(matches)}; showing the {kind} (use --kind to choose)")
    obj = host.get(kind, args.name)  # imports it; a PluginError says why it cannot
    info = host.info(kind, args.name)
    describe = {"template": _describe_template, "carrier": _describe_carrier, "backbone": _describe_backbone}
    data = describe[kind](host, info, obj)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        _print_info(data, obj)
    return 0


# -- dt doctor ------------------------------------------------------------------------------------------
@dataclass
class Finding:
    kind: str
    name: str
    distribution: str
    version: str
    category: str
    message: str

    def line(self) -> str:
        return f"{_where(self.kind, self.name, self.distribution, self.version)}: {self.message}"


def _finding(info: Any, category: str, message: str) -> Finding:
    return Finding(info.kind, info.name, info.distribution, info.version, category, message)


def _check_templates(host: Any) -> list[Finding]:
    """Metadata keywords that disagree with the loaded templates; carriers nobody provides."""
    findings: list[Finding] = []
    carrier_names = set(host.names("carrier"))
    by_dist: dict[str, list[Any]] = {}
    for info in host.infos:
        if info.kind == "template":
            by_dist.setdefault(info.distribution, []).append(info)
    for dist, infos in by_dist.items():
        try:
            findings += _check_distribution(host, dist, infos, carrier_names)
        except Exception as exc:  # a plugin attribute that raises must not cut the report short
            findings += [
                _finding(i, "load failed", f"its attributes could not be read: {type(exc).__name__}: {exc}")
                for i in infos
                if i.status == "loaded"
            ]
    return findings


def _check_distribution(host: Any, dist: str, infos: list[Any], carrier_names: set[str]) -> list[Finding]:
    """``_check_templates`` for the templates of one distribution."""
    findings: list[Finding] = []
    loaded = [i for i in infos if i.status == "loaded"]
    if not loaded:
        return findings
    objs = {i.name: host.get("template", i.name) for i in loaded}
    # Keywords may be scoped to one template (dt-carrier:kv@name): each template has its own view.
    all_meta_carriers: set[str] = set()
    all_meta_backbones: set[str] = set()
    all_carriers: set[str] = set()
    all_backbones: set[str] = set()
    for info in loaded:
        meta_carriers = set(info.carriers)
        meta_backbones = set(info.backbones) or {"*"}  # no dt-backbone keyword: no restriction claimed
        all_meta_carriers |= meta_carriers
        all_meta_backbones |= meta_backbones
        obj = objs[info.name]
        carriers = {str(c) for c in getattr(obj, "carriers", ()) or ()}
        backbones = {str(b) for b in getattr(obj, "backbones", ("*",)) or ()} or {"*"}
        all_carriers |= carriers
        all_backbones |= backbones
        undeclared = sorted(carriers - meta_carriers)
        if undeclared:
            findings.append(
                _finding(
                    info,
                    "metadata mismatch",
                    (
                        f"emits carrier(s) {', '.join(undeclared)} but the distribution's metadata declares "
                        f"{_joined(sorted(meta_carriers), 'none')} (add "
                        f"{', '.join('dt-carrier:' + c for c in undeclared)} to its Keywords)"
                    ),
                )
            )
        extra_backbones = sorted(backbones - meta_backbones)
        if extra_backbones and "*" not in meta_backbones:
            claim = "any backbone (*)" if "*" in backbones else f"backbone(s) {', '.join(extra_backbones)}"
            findings.append(
                _finding(
                    info,
                    "metadata mismatch",
                    (
                        f"supports {claim} but the distribution's metadata declares only "
                        f"{', '.join(sorted(meta_backbones))} (dt-backbone keywords)"
                    ),
                )
            )
        for carrier in sorted(carriers - carrier_names):
            findings.append(
                _finding(
                    info,
                    "missing carrier",
                    (
                        f"emits carrier {carrier!r}, which no installed carrier plugin provides "
                        f"(installed: {_joined(sorted(carrier_names), 'none')})"
                    ),
                )
            )
    if len(loaded) < len(infos):
        return findings  # some templates of this distribution did not load: their attributes are unknown
    names = ", ".join(sorted(objs))
    where = Finding("template", names, dist, loaded[0].version, "metadata mismatch", "")
    unused = sorted(all_meta_carriers - all_carriers)
    if unused:
        where.message = (
            f"the distribution's metadata declares carrier(s) {', '.join(unused)} "
            f"(dt-carrier keywords) that the plugin does not emit (it emits "
            f"{_joined(sorted(all_carriers), 'none')})"
        )
        findings.append(where)
    unclaimed = sorted(all_meta_backbones - all_backbones)
    if unclaimed and "*" not in all_backbones:
        what = (
            "declares no dt-backbone keyword (any backbone)"
            if unclaimed == ["*"]
            else (f"declares backbone(s) {', '.join(unclaimed)} (dt-backbone keywords)")
        )
        findings.append(
            Finding(
                "template",
                names,
                dist,
                loaded[0].version,
                "metadata mismatch",
                f"the distribution's metadata {what} but the plugin supports only "
                f"{', '.join(sorted(all_backbones))}",
            )
        )
    return findings


def _check_commands() -> list[Finding]:
    """Register every extension command into a scratch parser, as ``dt`` would, and report failures."""
    _, sub = _build_parser()
    sources, broken = _load_extensions(sub)
    findings = [
        Finding(
            "command",
            b.name,
            b.distribution,
            b.version,
            "command plugin",
            f"command plugin {b.value!r} could not be registered: {b.reason}",
        )
        for b in broken
    ]
    for command, source in sorted(sources.items()):
        if sub.choices[command].get_default("func") is None:
            findings.append(
                Finding(
                    "command",
                    command,
                    source.distribution,
                    source.version,
                    "command plugin",
                    f"command plugin {source.value!r} added {command!r} without set_defaults(func=)",
                )
            )
    return findings


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .plugins import PluginHost

    host = PluginHost()
    host.load_all()
    problems: list[Finding] = []
    notes: list[Finding] = []
    for info in sorted(host.infos, key=_sort_key):
        if info.status == "disabled":
            notes.append(_finding(info, "disabled", f"disabled: {info.problem}"))
        elif info.status == "incompatible":
            problems.append(_finding(info, "incompatible", f"incompatible host: {info.problem}"))
        elif info.status == "conflict":
            problems.append(_finding(info, "conflict", f"name conflict: {info.problem}"))
        elif info.status in ("broken", "error"):  # diagnosed where it was found (plugins.py)
            category, message = info.diagnosis or (info.status, f"{info.status}: {info.problem}")
            problems.append(_finding(info, category, message))
    problems += _check_templates(host)
    try:
        problems += _check_commands()
    except Exception as exc:  # the report is printed whatever a command plugin does
        problems.append(
            Finding(
                "command",
                "*",
                "<commands>",
                "",
                "command plugin",
                f"command plugins could not be checked: {type(exc).__name__}: {exc}",
            )
        )
    infos = sorted(host.infos, key=_sort_key)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not problems,
                    "plugins": [i.as_dict() for i in infos],
                    "problems": [vars(p) for p in problems],
                    "notes": [vars(n) for n in notes],
                },
                indent=2,
            )
        )
        return 1 if problems else 0
    loaded = sum(i.status == "loaded" for i in infos)
    print(
        _table(
            ("KIND", "NAME", "VERSION", "DISTRIBUTION", "STATUS"),
            [(i.kind, i.name, i.version or "-", i.distribution, i.status) for i in infos],
        )
    )
    print(f"\n{len(infos)} plugins: {loaded} loaded, {len(problems)} problem(s), {len(notes)} disabled")
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  {p.line()}")
    if notes:
        print("\ndisabled (not counted as problems):")
        for n in notes:
            print(f"  {n.line()}")
    if not problems:
        print("\nno problems found")
    return 1 if problems else 0


# -- dt demo / dt generate -------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib
    import os

    # transformers warns at import about optional image backends the pipelines never use here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    try:
        demo = importlib.import_module(f"{__package__}.demo")
    except Exception as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}.demo"
        why = "it is not part of this installation" if missing else f"{type(exc).__name__}: {exc}"
        _err(
            f"`dt {args.command}` needs the diffusion_templates.demo module, which could not be imported: "
            f"{why}"
        )
        return 1
    entry = getattr(demo, "main", None)
    if not callable(entry):
        _err(f"`dt {args.command}`: diffusion_templates.demo has no main(args) function")
        return 1
    return int(entry(args) or 0)


# -- parser, extension commands ----------------------------------------------------------------------------
@dataclass
class _Source:
    """Where an extension command comes from (and, for a broken one, why it failed)."""

    name: str
    distribution: str
    version: str
    value: str
    reason: str = ""


def _build_parser() -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(
        prog="dt",
        description="Diffusion Templates: controllable-generation plugins for diffusers pipelines.",
        epilog="Installed distributions may add commands (entry point group diffusion_templates.commands).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser(
        "list",
        help="list installed plugins (reads metadata, imports nothing)",
        description="List installed plugins from package metadata alone (imports no plugin).",
    )
    p.add_argument(
        "--kind", choices=(*KINDS, BASE_KIND), help="only plugins of this kind (base: base models)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "info",
        help="describe one plugin: inputs, carriers, backbones",
        description="Import one plugin and describe it (inputs schema, carriers, backbones).",
    )
    p.add_argument("name", help="plugin name (see `dt list`)")
    p.add_argument("--kind", choices=KINDS, help="which kind, when a name is used by several kinds")
    p.add_argument("--json", action="store_true", help="print JSON (inputs as JSON Schema)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "doctor",
        help="import every plugin and report problems",
        description="Import every plugin and report each problem; exit code 1 if there are any.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser(
        "demo",
        help="run the demo: a contact sheet of every installed template",
        description="Generate a contact sheet (base image, each installed template alone, the "
        "paper's fusion examples) and a report of measured effects.",
    )
    p.add_argument("--out", metavar="DIR", default="dt-demo", help="output directory (default: dt-demo)")
    p.add_argument(
        "--steps", metavar="N", type=positive_int, help="denoising steps (default: the base model's)"
    )
    p.add_argument("--base", metavar="MODEL", help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (.bin/.pt/.ckpt) from --base: pickles can run code, "
        "use only for files you trust (default: refused)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "generate",
        help="generate an image with templates",
        description="Generate an image with templates, e.g. "
        "dt generate --prompt 'a red circle' --template brightness scale=0.8",
    )
    p.add_argument("--prompt", default="", help="the text prompt")
    p.add_argument(
        "--template",
        "-t",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "KEY=VALUE"),
        help="a template and its inputs (repeatable); values are JSON or plain strings",
    )
    p.add_argument(
        "--negative-template",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "KEY=VALUE"),
        help="a template for the unconditional CFG branch (repeatable)",
    )
    p.add_argument("--base", metavar="MODEL", help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (.bin/.pt/.ckpt) from --base: pickles can run code, "
        "use only for files you trust (default: refused)",
    )
    p.add_argument("--steps", metavar="N", type=positive_int, help="denoising steps")
    # seed and out default to None here: a job file's values win over defaults, not over given flags.
    p.add_argument("--seed", type=int, help="random seed (default: the job's, else 0)")
    p.add_argument(
        "--size",
        type=positive_int,
        help="image height and width in pixels, a multiple of the model's size multiple",
    )
    p.add_argument("--guidance", type=float, help="CFG scale passed to the pipeline")
    p.add_argument("--job", metavar="FILE", help="a YAML/JSON job file with any of these fields (CLI wins)")
    p.add_argument("--out", metavar="FILE", help="output image (default: the job's, else out.png)")
    p.set_defaults(func=_cmd_demo)
    return parser, sub


def _load_extensions(sub: Any) -> tuple[dict[str, _Source], list[_Source]]:
    """Call every ``diffusion_templates.commands`` register function; a broken one is recorded, not raised.

    Returns the commands added (name -> where from) and the entry points that failed.
    """
    from .installed import entries
    from .interrupts import InterruptWatch

    sources: dict[str, _Source] = {}
    broken: list[_Source] = []
    for entry in entries([COMMANDS_GROUP]):  # one broken distribution or line spoils only itself
        source = _Source(entry.name, entry.dist.name, entry.dist.version, entry.value)
        if entry.problem is not None:
            source.reason = entry.problem
            broken.append(source)
            continue
        before = set(sub.choices)
        # BaseException: a plugin's sys.exit() or its own KeyboardInterrupt is its failure; the user's
        # Ctrl-C propagates (InterruptWatch, as for template plugins in plugins.py).
        with InterruptWatch() as watch:
            try:
                register = entry.entry_point().load()
                if not callable(register):
                    raise TypeError(
                        f"{entry.value} is a {type(register).__name__}, not a register(subparsers) function"
                    )
                register(sub)
            except BaseException as exc:
                if watch.is_users(exc):
                    raise
                source.reason = f"{type(exc).__name__}: {exc}"
                broken.append(source)
                continue
        for name in set(sub.choices) - before:
            sources[name] = source
    return sources, broken


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return int(code)
    print(code, file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dt`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else None
    parser, sub = _build_parser()
    sources: dict[str, _Source] = {}
    if first not in BUILTIN_COMMANDS:  # extension commands load only when they may be wanted
        sources, broken = _load_extensions(sub)
        messages = {
            b.name: (
                f"command plugin {b.name!r} (distribution {b.distribution}, entry point "
                f"{b.value!r}) could not be loaded: {b.reason}"
            )
            for b in broken
        }
        if first in messages and first not in sources:  # the command asked for is the broken one
            _err(messages[first])
            return 1
        for message in messages.values():
            _warn(message)
    if not argv:
        parser.print_help()
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed the message
        return _exit_code(exc.code)
    func = getattr(args, "func", None)
    if func is None:
        source = sources.get(args.command)
        origin = f" (from {source.distribution}, {source.value!r})" if source else ""
        _err(f"command {args.command!r}{origin} did not set func= (set_defaults) in its parser")
        return 1
    try:
        return _exit_code(func(args))
    except UsageError as exc:
        _err(str(exc))
        return 2
    except TemplateError as exc:
        if os.environ.get("DT_TRACEBACK"):
            raise
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return _exit_code(exc.code)
    except Exception as exc:
        source = sources.get(args.command)
        if source is None or os.environ.get("DT_TRACEBACK"):
            raise  # a bug in dt itself: the traceback is the report
        _err(
            f"command {args.command!r} (from {source.distribution}, {source.value!r}) failed: "
            f"{type(exc).__name__}: {exc} (set DT_TRACEBACK=1 for the traceback)"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
