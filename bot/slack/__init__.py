"""The Slack front end: /devices, the upload modal, approval buttons and threaded results."""
