"""The ClickHouse schema migrations (NNN_<name>.sql), also the package ``consumer.migrations``.

They live here, at the top of the repository; consumer/migrations links to this directory so the
wheel carries them as package data and consumer.sink.migrate reads them with importlib.resources.
"""
