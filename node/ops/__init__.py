"""Operations: metrics, logs, alerts, fleet membership, doctor, sd_notify."""
