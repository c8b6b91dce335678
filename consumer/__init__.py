"""CDC consumer: Debezium change events from Kafka into an exact ad-tech star schema in ClickHouse."""

__version__ = "0.1.0"
