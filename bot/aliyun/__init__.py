"""The Alibaba Cloud IoT Platform client: signing, errors, rate limits, and the five batch operations."""
