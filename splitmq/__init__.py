"""splitmq: asynchronous split learning over RabbitMQ."""
__version__ = "0.2.0"
