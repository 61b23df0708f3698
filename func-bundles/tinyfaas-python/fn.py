# A tinyFaaS python3 function, unchanged: fn(body, headers) gets the body as
# a string (None when empty) and the headers; it returns a string or None.
import json


def fn(input, headers):
    if input is None:
        return None
    words = input.split()
    return json.dumps({"words": len(words), "agent": headers.get("user-agent", "")})
