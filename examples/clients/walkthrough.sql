-- The README's psql walkthrough as a script: psql -X -f examples/clients/walkthrough.sql \
--     'postgresql://demo:demo@127.0.0.1:6432/demo'        (after `pgcloak demo`)
-- Refusals are errors; the script goes on past them.
\set ON_ERROR_STOP 0
\echo '-- a row with protected columns, written in clear through pgcloak'
DELETE FROM users WHERE email = 'hedy@example.com';
INSERT INTO users (name, email, phone, ssn) VALUES ('Hedy', 'hedy@example.com', '+1 555 010 4242', '219-09-9999');
\echo '-- looked up by e-mail (any case: the policy normalizes e-mails)'
SELECT name, email, phone, ssn FROM users WHERE email = 'HEDY@example.com';
\echo '-- prepared with SQL, executed with a value'
PREPARE by_phone(text) AS SELECT name FROM users WHERE phone = $1;
EXECUTE by_phone('+1 (555) 010-4242');
DEALLOCATE by_phone;
\echo '-- refused: pattern matching on an encrypted column, and a dump of every e-mail'
SELECT name FROM users WHERE email LIKE 'h%';
SELECT email FROM users;
\echo '-- cleaned up'
DELETE FROM users WHERE email = 'hedy@example.com';
