"""The reports' Jinja2 templates, in ``Resources/Reports`` (``resources.resource_path``): one
environment, autoescaped, that fails on an undefined name rather than printing nothing."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    from ..resources import resource_path

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_path("Reports"))),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def render(template: str, context: Dict[str, Any]) -> str:
    """``Resources/Reports/<template>`` rendered with ``context``."""
    return _environment().get_template(template).render(**context)
