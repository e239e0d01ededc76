"""Stand-ins for the outside systems, apart from the product: the IoT Platform emulator and a local Slack.

Each is split the way a real service is: its state (an in-memory model on an injected clock), its
wire (the HTTP adapter that speaks the real protocol), and, where it has them, its people (the
workspace users and what they do). The demo, the tests, the benchmarks and ``iotreg emulator`` use
them; the product itself never imports them except to offer ``iotreg serve --emulator``.
"""
