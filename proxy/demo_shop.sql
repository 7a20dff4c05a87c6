-- The demo "shop" database: schema and deterministic synthetic data.
--
-- Strategy: every value is a pure function of its row number (generate_series plus
-- modular arithmetic over small word lists), so the same row count always yields the
-- same rows, byte for byte: tests may hard-code a customer, a ticket number or a phone.
-- Run it in one session after
--     SELECT set_config('pgwarden.demo_customers', '<N>', false);
-- (proxy.demo.shop_sql does that). Re-running rebuilds the tables from scratch.
--
-- What is sensitive here is what the incident leaked: names, e-mail addresses,
-- phone numbers, street addresses, support ticket numbers, plus card numbers. Ticket
-- bodies repeat the caller's name and number, as real free text does.
--
-- Tickets carry their assignee, the support agent's pgwarden login, so that the demo
-- policy can bind each agent to the customers of their own open tickets (row_filter):
-- the newest 1,000 tickets are the current queue, assigned round-robin by ticket
-- number over nine slots: alice, carol, five other agents, and two slots unassigned
-- (NULL); older tickets belong to agents who have left, or to nobody. So alice holds
-- about 111 of the queue's tickets, about 83 of them not closed, whatever N is.
--
-- Decoys: customers 73, 14009, 27941, 41257 and 60331 (those that exist for N) are
-- planted records, listed under `decoys:` in policies/example.yaml. They look like
-- every other customer, but have no ticket, no order and no card (their ids are
-- odd): no honest look-up ever needs one, and anyone paging through the table from
-- the start meets customer 73 on the first hundred rows. A ticket or an order whose
-- stride lands on a decoy goes to the customer before it instead.

BEGIN;

SELECT set_config('pgwarden.demo_decoys', '{73,14009,27941,41257,60331}', false);

-- A customer id, or the one before it when it is a decoy (decoys are far apart).
CREATE FUNCTION pg_temp.not_decoy(id bigint) RETURNS integer LANGUAGE sql STABLE AS $$
    SELECT (CASE WHEN id = ANY (current_setting('pgwarden.demo_decoys')::bigint[])
                 THEN id - 1 ELSE id END)::integer
$$;

DROP TABLE IF EXISTS payment_cards, orders, support_tickets, customers;

CREATE TABLE customers (
    id        serial PRIMARY KEY,
    full_name text NOT NULL,
    email     text NOT NULL UNIQUE,
    phone     text NOT NULL,
    street    text NOT NULL
);

CREATE TABLE support_tickets (
    id          serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    ticket_no   text NOT NULL UNIQUE,
    subject     text NOT NULL,
    body        text NOT NULL,
    status      text NOT NULL,
    assignee    text,
    created_at  timestamptz NOT NULL
);

CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    total       numeric(10, 2) NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE payment_cards (
    id          serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    pan         text NOT NULL,
    expiry      text NOT NULL
);

-- customers: id g = 1..N. Phones are a bijection of g (1000003 is prime, so
-- g -> g * 1000003 mod 10^7 never repeats), hence unique, as are the e-mails.
INSERT INTO customers (id, full_name, email, phone, street)
SELECT g,
       first || ' ' || last,
       lower(first) || '.' || lower(last) || g || '@'
           || (ARRAY['example.com', 'example.org', 'example.net', 'mail.example',
                     'inbox.example'])[1 + g % 5],
       '+1-555-' || lpad(((g::bigint * 1000003) % 10000000)::text, 7, '0'),
       (1 + (g * 31) % 9999) || ' '
           || (ARRAY['Oak', 'Maple', 'Cedar', 'Elm', 'Pine', 'Birch', 'Willow', 'Ash',
                     'Spruce', 'Poplar', 'Hazel', 'Alder', 'Linden', 'Juniper', 'Aspen',
                     'Magnolia', 'Chestnut', 'Sycamore', 'Hawthorn', 'Rowan'])[1 + g % 20]
           || (ARRAY[' Street', ' Avenue', ' Road', ' Lane', ' Way'])[1 + (g / 20) % 5]
FROM (
    SELECT g,
           (ARRAY['Alice', 'Bruno', 'Chiara', 'Dmitri', 'Elena', 'Farid', 'Greta', 'Hiro',
                  'Ines', 'Jonas', 'Kavya', 'Liam', 'Mira', 'Noah', 'Olga', 'Pedro',
                  'Quinn', 'Rosa', 'Sven', 'Tara', 'Umar', 'Vera', 'Wen', 'Ximena',
                  'Yusuf', 'Zoe', 'Anton', 'Bea', 'Carlos', 'Dana'])[1 + (g * 7) % 30] AS first,
           (ARRAY['Smith', 'Garcia', 'Muller', 'Rossi', 'Novak', 'Silva', 'Kim', 'Okafor',
                  'Jensen', 'Dubois', 'Tanaka', 'Kowalski', 'Haddad', 'Nguyen', 'Ivanova',
                  'Costa', 'Fischer', 'Larsen', 'Moreau', 'Patel', 'Schmidt', 'Lopez',
                  'Berg', 'Sato', 'Ahmed', 'Weber', 'Romano', 'Ortiz', 'Becker',
                  'Lindqvist'])[1 + (g * 13) % 30] AS last
    FROM generate_series(1, current_setting('pgwarden.demo_customers')::int) AS g
) AS n;

-- support_tickets: 3 for every 2 customers, spread over customers by a stride (never
-- a decoy); the assignee as described at the top.
INSERT INTO support_tickets
    (id, customer_id, ticket_no, subject, body, status, assignee, created_at)
SELECT t.t,
       c.id,
       'TKT-' || lpad(t.t::text, 7, '0'),
       t.subject,
       'Caller ' || c.full_name || ' (' || c.email || ') about: ' || lower(t.subject)
           || '. Call back on ' || c.phone || '.',
       (ARRAY['open', 'pending', 'solved', 'closed'])[1 + t.t % 4],
       CASE
           WHEN t.t > t.total - 1000
               THEN (ARRAY['alice', 'carol', 'grace', 'heidi', 'ivan', 'judy', 'ken',
                           NULL, NULL])[1 + t.t % 9]
           ELSE (ARRAY['olaf', 'petra', 'rui', NULL, NULL])[1 + t.t % 5]
       END,
       timestamptz '2024-01-01 00:00:00+00' + t.t * interval '47 minutes'
FROM (
    SELECT t,
           current_setting('pgwarden.demo_customers')::int * 3 / 2 AS total,
           pg_temp.not_decoy(
               1 + ((t - 1)::bigint * 7919) % current_setting('pgwarden.demo_customers')::int
           ) AS cid,
           (ARRAY['Cannot log in', 'Refund request', 'Change of address', 'Invoice missing',
                  'Card declined', 'Delivery late', 'Cancel subscription', 'Upgrade plan',
                  'Password reset', 'Duplicate charge'])[1 + t % 10] AS subject
    FROM generate_series(1, current_setting('pgwarden.demo_customers')::int * 3 / 2) AS t
) AS t
JOIN customers AS c ON c.id = t.cid;

-- orders: 2 per customer on average.
INSERT INTO orders (id, customer_id, total, created_at)
SELECT o,
       pg_temp.not_decoy(
           1 + ((o - 1)::bigint * 104729) % current_setting('pgwarden.demo_customers')::int
       ),
       5 + ((o::bigint * 7907) % 50000) / 100.0,
       timestamptz '2024-01-01 00:00:00+00' + o * interval '31 minutes'
FROM generate_series(1, current_setting('pgwarden.demo_customers')::int * 2) AS o;

-- payment_cards: every even customer has one (16 digits, starting with 4).
INSERT INTO payment_cards (id, customer_id, pan, expiry)
SELECT g / 2,
       g,
       '4' || lpad(((g::bigint * 982451653) % 1000000000000000)::text, 15, '0'),
       lpad((1 + g % 12)::text, 2, '0') || '/' || (26 + g % 5)
FROM generate_series(2, current_setting('pgwarden.demo_customers')::int, 2) AS g;

SELECT setval(pg_get_serial_sequence('customers', 'id'), (SELECT max(id) FROM customers));
SELECT setval(pg_get_serial_sequence('support_tickets', 'id'), (SELECT max(id) FROM support_tickets));
SELECT setval(pg_get_serial_sequence('orders', 'id'), (SELECT max(id) FROM orders));
SELECT setval(pg_get_serial_sequence('payment_cards', 'id'), (SELECT max(id) FROM payment_cards));

CREATE INDEX customers_phone_idx ON customers (phone);
CREATE INDEX support_tickets_customer_idx ON support_tickets (customer_id);
CREATE INDEX support_tickets_assignee_idx ON support_tickets (assignee, status);
CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX payment_cards_customer_idx ON payment_cards (customer_id);

COMMIT;

ANALYZE customers, support_tickets, orders, payment_cards;
