"""iotreg: register IoT devices in batches on Alibaba Cloud IoT Platform, from Slack."""

__version__ = "0.1.0"
