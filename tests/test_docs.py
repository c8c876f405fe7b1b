"""The documentation cannot drift from the code: the config reference is generated, the sample config
has exactly the code's keys, the help lists every subcommand, and links between the docs resolve."""

from __future__ import annotations

import re
import sys
from dataclasses import fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from conftest import ROOT

import config_docs  # scripts/, on the path through conftest
from captiond.cli import build_parser
from captiond.config import SECTIONS


def test_configuration_md_is_what_the_generator_makes():
    committed = config_docs.TARGET.read_text(encoding="utf-8")
    assert config_docs.NOTES in committed, "the hand-written notes marker is gone"
    assert config_docs.render(committed) == committed, "docs/configuration.md is out of date: run `make docs`"


def test_every_key_documented_in_the_reference():
    reference = config_docs.reference()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"| `{section}.{f.name}` |" in reference


def test_sample_config_has_exactly_the_code_keys():
    shipped = tomllib.loads((ROOT / "config" / "captiond.toml").read_text(encoding="utf-8"))
    in_file = {f"{section}.{key}" for section, table in shipped.items() for key in table}
    in_code = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)}
    assert not in_code - in_file, f"config/captiond.toml lacks {sorted(in_code - in_file)}"
    assert not in_file - in_code, f"config/captiond.toml has keys the code does not know: {sorted(in_file - in_code)}"


def _subcommands():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    return parser, choices


def test_help_lists_every_subcommand_with_a_description():
    parser, choices = _subcommands()
    top = parser.format_help()
    for name, sub in choices.items():
        assert re.search(rf"^\s+{re.escape(name)}\s", top, re.M), f"`captiond --help` does not list {name}"
        assert sub.description, f"`captiond {name} --help` has no description"


def _anchors(page) -> set[str]:
    """The #fragments a page offers: GitHub's slugs of its headings, and explicit <a id> anchors."""
    text = page.read_text(encoding="utf-8")
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return slugs | set(re.findall(r'<a id="([^"]+)">', text))


def test_links_between_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            linked = page.parent / target if target else page
            where = f"{page.relative_to(ROOT)} links to {target}#{fragment}"
            assert linked.exists(), f"{where}: no such file"
            if fragment and linked.suffix == ".md":
                assert fragment in _anchors(linked), f"{where}: no such heading"
