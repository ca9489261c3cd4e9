"""Per-process state of an ingress replica, shared by the Api class and the HTTP middleware.

It lives in its own module on purpose: `@serve.ingress` freezes the FastAPI app (and with it
the middleware and the route methods) by pickling it when app.py is imported, so a global
in app.py would be a different copy in each of them. An import at call time reaches this
one real module.
"""

STATE: dict = {}
