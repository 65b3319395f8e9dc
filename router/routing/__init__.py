"""Routing: where a stanza goes (route table, built-in services, delivery, queues, bounces) and admission counts."""
