-- The example's table (what an application already has), then what
-- `pgcloak policy ddl policy.yaml --unique users.email` prints for the policy.
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    email text,
    phone text,
    ssn text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- public.users
ALTER TABLE public.users ALTER COLUMN email TYPE text;  -- stored values are longer than the plaintext
CREATE UNIQUE INDEX IF NOT EXISTS users_email_pgcloak_idx ON public.users ((left(email, 22)));
-- then drop the old UNIQUE constraint on email (ciphertext is randomized, so it means nothing now), e.g.: ALTER TABLE public.users DROP CONSTRAINT users_email_key;
ALTER TABLE public.users DROP CONSTRAINT IF EXISTS users_email_pgcloak_check, ADD CONSTRAINT users_email_pgcloak_check CHECK (email IS NULL OR email ~ '^[A-Za-z0-9_-]{22}\.pgc1:[A-Za-z0-9_-]{47,}$') NOT VALID;  -- only ciphertext, whoever writes (a view, a function, a direct connection)
ALTER TABLE public.users ALTER COLUMN phone TYPE text;  -- stored values are longer than the plaintext
CREATE INDEX IF NOT EXISTS users_phone_pgcloak_idx ON public.users ((left(phone, 22)));
ALTER TABLE public.users DROP CONSTRAINT IF EXISTS users_phone_pgcloak_check, ADD CONSTRAINT users_phone_pgcloak_check CHECK (phone IS NULL OR phone ~ '^[A-Za-z0-9_-]{22}\.pgc1:[A-Za-z0-9_-]{47,}$') NOT VALID;  -- only ciphertext, whoever writes (a view, a function, a direct connection)
ALTER TABLE public.users ALTER COLUMN ssn TYPE text;  -- stored values are longer than the plaintext
ALTER TABLE public.users DROP CONSTRAINT IF EXISTS users_ssn_pgcloak_check, ADD CONSTRAINT users_ssn_pgcloak_check CHECK (ssn IS NULL OR ssn ~ '^pgc1:[A-Za-z0-9_-]{47,}$') NOT VALID;  -- only ciphertext, whoever writes (a view, a function, a direct connection)

