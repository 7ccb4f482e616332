"""Replace one ``## `` section of a Markdown model card (the scripts that rewrite a card's figures share it)."""
from __future__ import annotations

from pathlib import Path


def replace_section(card_path: Path, heading: str, text: str, before: str = "## Intended use") -> None:
    """Put ``text`` (starting with ``heading``) in place of the card's section ``heading``, or,
    when it has none yet, just before the section ``before``."""
    card = card_path.read_text(encoding="utf-8")
    text = text.rstrip("\n") + "\n\n"
    start = card.find(heading)
    if start >= 0:
        end = card.find("\n## ", start + len(heading))
        card = card[:start] + text + (card[end + 1:] if end >= 0 else "")
    else:
        marker = card.find(before)
        card = card[:marker] + text + card[marker:]
    card_path.write_text(card, encoding="utf-8")
