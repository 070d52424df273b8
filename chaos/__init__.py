"""Fault injection: scenario files, the runner that starts a platform, injects each fault on
schedule under load and checks what the platform did (`runner`). Sits above every other package
(it starts the whole platform); only the CLI imports it."""
