"""Count an article's words into `article-stats/<id>`.

The event is the document store's `created` event (docs/triggers.md):
`new` is the article as written. The stats document records the version
it was computed from, so a repeated event (delivery is at-least-once)
writes the same document again and changes nothing.
"""
from funcatron import store


def on_article(req):
    event = req.json()
    text = str((event.get("new") or {}).get("text", ""))
    stats = {
        "words": len(text.split()),
        "characters": len(text),
        "source_version": event["version"],
    }
    written = store.put("article-stats", event["id"], stats)
    return {"id": written["id"], "version": written["version"], "stats": stats}
