"""A config as YAML with what each key means: the comments of its field in config.py.

config.py is the reference of the settings: each field of a section's dataclass carries its
meaning as a comment on its line, and comment lines just above a field head it or a group of
fields ("# CLIP video tower"). `commented_yaml` writes a config with those comments beside its
values (`stoa-vlp config`), as a file that `--config` reads back to the same config.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing
from pathlib import Path

from stoa_vlp import config as config_module
from stoa_vlp.config import Config, yaml_line


@dataclasses.dataclass
class FieldComments:
    above: list[str]  # comment lines just above the field, "#" included
    beside: str  # the comment after the field on its line, "" without one


def field_comments() -> dict[str, FieldComments]:
    """{"section.key": its comments} for every setting, read from config.py's source."""
    source = Path(config_module.__file__).read_text(encoding="utf-8")
    comments = {  # line number: the comment on it
        token.start[0]: token.string
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    found = {}
    for section, section_class in typing.get_type_hints(Config).items():
        for statement in classes[section_class.__name__].body:
            if not isinstance(statement, ast.AnnAssign):
                continue
            above, line = [], statement.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            beside = comments.get(statement.end_lineno, "")
            found[f"{section}.{statement.target.id}"] = FieldComments(above, beside)
    return found


def commented_yaml(config: Config) -> str:
    """`config` as YAML, every key with its comments from config.py."""
    comments = field_comments()
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"{section}:")
        for name, value in values.items():
            comment = comments[f"{section}.{name}"]
            lines += [f"  {line}" for line in comment.above]
            entry = f"{name}: {yaml_value(value)}"
            lines.append(f"  {entry}  {comment.beside}" if comment.beside else f"  {entry}")
    return "\n".join(lines) + "\n"


def yaml_value(value) -> str:
    """A setting's value as one line of YAML that reads back as it: a tuple as a list, a string quoted
    where it needs to be (a " #" starts a comment, ": " a mapping)."""
    return yaml_line(list(value) if isinstance(value, tuple) else value, default_flow_style=True)
