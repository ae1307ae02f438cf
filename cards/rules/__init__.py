"""The CMV rules, plain functions from patient facts to cards. Start at ``cards.rules.precedence``: the table
of every rule in the order it takes precedence; the modules hold the rules by clinical concern (exclusions,
steering, dosing cards, adjuncts) and what they share (common)."""
