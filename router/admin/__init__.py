"""The operator's admin interface: the relay's control socket (``control``) and ``python -m router ctl`` (``ctl``)."""
