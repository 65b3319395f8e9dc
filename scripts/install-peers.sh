#!/usr/bin/env bash
# Placeholder until the interop harness lands: nothing to install yet.
exit 0
