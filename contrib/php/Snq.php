<?php
/**
 * snq's producer for PHP: puts work on snq's queues from a PHP application.
 *
 * One file, no framework: PDO for the SQL backend, a plain socket for Redis
 * and STOMP.  It writes snq's wire formats (docs/producer.rst, "The wire
 * formats") and routes items as the daemon does, from a config array shaped
 * like snq.toml:
 *
 *     $snq = new Snq\Producer(['queue' => ['backend' => 'redis'],
 *                              'redis' => ['url' => 'redis://127.0.0.1:6379/0']]);
 *     $id = $snq->enqueue('webhook', ['url' => 'https://example.org/hook']);
 *
 * Tested by snq's suite (tests/test_php.py) against real servers.
 */

declare(strict_types=1);

namespace Snq;

/** The backend did not take the items (or did not say it had); see getPrevious(). */
class EnqueueError extends \RuntimeException
{
}

final class Producer
{
    /** Handlers of snq's own whose group is not "main". */
    private const HANDLER_GROUPS = ['xmppout' => 'xmpp'];
    /** Delays are rounded to this many steps per doubling (snq's retry queues). */
    private const STEPS_PER_DOUBLING = 4;
    private const MAX_TTL = 4294967295;
    private const NAMED = ['/queue/', '/topic/', '/amq/queue/'];

    private array $config;
    private string $backend;
    private ?\PDO $pdo;
    /** @var resource|null A Redis or STOMP connection. */
    private $socket = null;
    private ?int $socketPid = null;
    private bool $rabbitmq = false;
    private bool $escape = false;
    private int $receipts = 0;

    /**
     * $config: like snq.toml, as an array ('queue', 'db', 'redis', 'stomp',
     * 'transports' sections; every key optional, with snq's defaults).  $pdo:
     * for the SQL backend, the application's own connection, so that an item
     * enqueued inside its transaction exists if and only if it commits;
     * without it, one is made from [db] url.
     */
    public function __construct(array $config = [], ?\PDO $pdo = null)
    {
        $this->config = $config;
        $this->backend = $config['queue']['backend'] ?? 'db';
        if (!in_array($this->backend, ['db', 'redis', 'stomp'], true)) {
            throw new \InvalidArgumentException(
                "[queue] backend: expected db | redis | stomp, got {$this->backend}");
        }
        $this->pdo = $pdo;
    }

    public function __destruct()
    {
        $this->close();
    }

    /**
     * Store one item; returns its id.  $options: 'site' (default "default"),
     * 'priority' (default [transports.NAME] priority, else 0), 'delay'
     * (seconds) or 'run_at' (UNIX seconds, or a DateTimeInterface), 'key'.
     */
    public function enqueue(string $transport, $payload, array $options = []): string
    {
        $keys = array_key_exists('key', $options) ? [$options['key']] : null;
        unset($options['key']);
        return $this->enqueueMany($transport, [$payload], $options + ['keys' => $keys])[0];
    }

    /**
     * Store one item per payload, all or none; returns their ids.  As
     * enqueue(), with 'keys' (one per payload) instead of 'key'.
     */
    public function enqueueMany(string $transport, array $payloads, array $options = []): array
    {
        self::checkName('transport', $transport);
        $site = $options['site'] ?? 'default';
        self::checkName('site', $site);
        $priority = $options['priority']
            ?? ($this->config['transports'][$transport]['priority'] ?? 0);
        if (!is_int($priority)) {
            throw new \InvalidArgumentException('priority must be an integer');
        }
        $payloads = array_values($payloads);
        $keys = $options['keys'] ?? array_fill(0, count($payloads), null);
        if (count($keys) !== count($payloads)) {
            throw new \InvalidArgumentException(count($keys) . ' keys for '
                . count($payloads) . ' payloads');
        }
        $now = microtime(true);
        $runAt = self::due($now, $options);
        $items = [];
        foreach ($payloads as $n => $payload) {
            $envelope = [
                'v' => 1, 'id' => bin2hex(random_bytes(16)), 'site' => $site,
                'transport' => $transport, 'payload' => $payload, 'attempts' => 0,
                'created' => $now, 'priority' => $priority,
            ];
            // Only when used: a frame without them is one every daemon takes.
            if ($runAt !== null) {
                $envelope['run_at'] = $runAt;
            }
            $key = $keys[$n];
            if ($key !== null) {
                if (!is_string($key) || $key === '' || strlen($key) > 255) {
                    throw new \InvalidArgumentException(
                        'key must be a non-empty string of at most 255 characters');
                }
                $envelope['key'] = $key;
            }
            $envelope['frame'] = json_encode($envelope, JSON_UNESCAPED_SLASHES
                | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR);
            $items[] = $envelope;
        }
        if (!$items) {
            return [];
        }
        try {
            if ($this->backend === 'db') {
                $this->storeSql($items);
            } elseif ($this->backend === 'redis') {
                $this->retried(fn () => $this->storeRedis($items, $now));
            } else {
                $this->retried(fn () => $this->storeStomp($items, $now));
            }
        } catch (\Throwable $e) {
            throw new EnqueueError("cannot enqueue on {$this->backend}: "
                . $e->getMessage(), 0, $e);
        }
        return array_column($items, 'id');
    }

    /**
     * Publish "shutdown", "restart" or "update:SITE" on the STOMP control
     * channel, signed with [stomp] control_secret when it is set.
     */
    public function control(string $command): void
    {
        if ($this->backend !== 'stomp') {
            throw new \LogicException('the control channel is STOMP\'s');
        }
        if (!preg_match('/^(shutdown|restart|update:[^\s\/]+)$/', $command)) {
            throw new \InvalidArgumentException("unknown control command $command");
        }
        $stomp = $this->config['stomp'] ?? [];
        $timestamp = sprintf('%.3f', microtime(true));
        $nonce = bin2hex(random_bytes(12));
        $headers = ['content-type' => 'text/plain', 'snq-timestamp' => $timestamp,
                    'snq-nonce' => $nonce];
        $secret = (string) ($stomp['control_secret'] ?? '');
        if ($secret !== '') {
            $headers['snq-signature'] = hash_hmac(
                'sha256', "snq-control\n$timestamp\n$nonce\n$command", $secret);
        }
        $channel = $stomp['control_channel'] ?? '/topic/snq/control';
        try {
            $this->retried(fn () => $this->sendAll([[$channel, $command, $headers]]));
        } catch (\Throwable $e) {
            throw new EnqueueError('cannot publish on the control channel: '
                . $e->getMessage(), 0, $e);
        }
    }

    /** Close the Redis or STOMP connection (the PDO is the application's). */
    public function close(): void
    {
        if ($this->socket !== null && $this->socketPid === getmypid()) {
            if ($this->backend === 'stomp') {
                @fwrite($this->socket, "DISCONNECT\n\n\0");
            }
            @fclose($this->socket);
        }
        $this->socket = null;
    }

    // -- SQL ---------------------------------------------------------------

    private function storeSql(array $items): void
    {
        $pdo = $this->pdo ??= self::pdoFromUrl($this->config['db']['url'] ?? 'sqlite:///snq.sqlite');
        $insert = $pdo->prepare('INSERT INTO queue_item (frame, transport, site, priority,'
            . ' created, run_at, attempts) VALUES (?, ?, ?, ?, ?, ?, 0)');
        // Inside the application's transaction if it has one open.
        $own = count($items) > 1 && !$pdo->inTransaction();
        if ($own) {
            $pdo->beginTransaction();
        }
        try {
            foreach ($items as $item) {
                $done = $insert->execute([$item['frame'], $item['transport'], $item['site'],
                    $item['priority'], $item['created'], $item['run_at'] ?? $item['created']]);
                if ($done === false) {
                    throw new \RuntimeException(implode(' ', $insert->errorInfo()));
                }
            }
            if ($own) {
                $pdo->commit();
            }
        } catch (\Throwable $e) {
            if ($own) {
                $pdo->rollBack();
            }
            throw $e;
        }
    }

    /** sqlite:///PATH, postgresql://…, mysql://… (as in snq.toml) → a PDO. */
    private static function pdoFromUrl(string $url): \PDO
    {
        $options = [\PDO::ATTR_ERRMODE => \PDO::ERRMODE_EXCEPTION];
        if (str_starts_with($url, 'sqlite://')) {
            $path = substr($url, strlen('sqlite:///'));
            return new \PDO("sqlite:$path", null, null, $options);
        }
        $parts = parse_url($url);
        $scheme = $parts['scheme'] ?? '';
        if (!in_array($scheme, ['postgresql', 'mysql'], true)) {
            throw new \InvalidArgumentException('[db] url: sqlite:///PATH, postgresql://… or mysql://…');
        }
        $dsn = ($scheme === 'mysql' ? 'mysql' : 'pgsql') . ':host=' . ($parts['host'] ?? 'localhost')
            . ';port=' . ($parts['port'] ?? ($scheme === 'mysql' ? 3306 : 5432))
            . ';dbname=' . rawurldecode(ltrim($parts['path'] ?? '', '/'))
            . ($scheme === 'mysql' ? ';charset=utf8mb4' : '');
        return new \PDO($dsn, rawurldecode($parts['user'] ?? ''),
            rawurldecode($parts['pass'] ?? ''), $options);
    }

    // -- Redis ---------------------------------------------------------------

    private function storeRedis(array $items, float $now): void
    {
        $this->connectRedis();
        $prefix = $this->config['redis']['prefix'] ?? 'snq:';
        // All or none: MULTI … EXEC, in one write.
        $commands = [['MULTI']];
        foreach ($items as $item) {
            $spec = $this->route($item['transport'], $item['site']);
            $due = $item['run_at'] ?? null;
            if ($due !== null && $due > $now) {
                // A delayed set beside the list: members TOKEN \n FRAME.
                $commands[] = ['ZADD', "{$prefix}delayed:$spec", sprintf('%.6f', $due),
                               $item['id'] . "\n" . $item['frame']];
            } else {
                $commands[] = ['LPUSH', "{$prefix}q:$spec", $item['frame']];
            }
        }
        $commands[] = ['EXEC'];
        $replies = $this->redis($commands);
        $executed = end($replies);
        if (!is_array($executed)) {
            throw new \RuntimeException('Redis: the transaction was aborted');
        }
        foreach ($executed as $reply) {
            if ($reply instanceof \RuntimeException) {
                throw $reply;
            }
        }
    }

    private function connectRedis(): void
    {
        if ($this->connected()) {
            return;
        }
        $url = parse_url($this->config['redis']['url'] ?? 'redis://127.0.0.1:6379/0');
        $tls = ($url['scheme'] ?? '') === 'rediss';
        $this->open(($tls ? 'tls' : 'tcp') . '://' . ($url['host'] ?? '127.0.0.1') . ':'
            . ($url['port'] ?? 6379), (float) ($this->config['redis']['timeout'] ?? 10));
        $commands = [];
        if (isset($url['pass'])) {
            $commands[] = array_merge(['AUTH'], isset($url['user']) && $url['user'] !== ''
                ? [rawurldecode($url['user'])] : [], [rawurldecode($url['pass'])]);
        }
        $db = (int) trim($url['path'] ?? '', '/');
        if ($db) {
            $commands[] = ['SELECT', (string) $db];
        }
        if ($commands) {
            $this->redis($commands);
        }
    }

    /** Send commands in one write; the replies, a "-" reply thrown. */
    private function redis(array $commands): array
    {
        $out = '';
        foreach ($commands as $command) {
            $out .= '*' . count($command) . "\r\n";
            foreach ($command as $argument) {
                $out .= '$' . strlen((string) $argument) . "\r\n$argument\r\n";
            }
        }
        $this->write($out);
        $replies = [];
        foreach ($commands as $_) {
            $reply = $this->readReply();
            if ($reply instanceof \RuntimeException) {
                throw $reply;
            }
            $replies[] = $reply;
        }
        return $replies;
    }

    private function readReply()
    {
        $line = $this->readLine();
        $rest = substr($line, 1);
        switch ($line[0]) {
            case '+':
                return $rest;
            case '-':
                return new \RuntimeException("Redis: $rest");
            case ':':
                return (int) $rest;
            case '$':
                return $rest === '-1' ? null : substr($this->readBytes((int) $rest + 2), 0, -2);
            case '*':
                $items = [];
                for ($i = 0; $i < (int) $rest; $i++) {
                    $items[] = $this->readReply();
                }
                return $rest === '-1' ? null : $items;
        }
        throw new \UnexpectedValueException('Redis: unexpected reply ' . substr($line, 0, 40));
    }

    // -- STOMP ---------------------------------------------------------------

    private function storeStomp(array $items, float $now): void
    {
        $basename = $this->config['queue']['basename'] ?? '/queue/snq/';
        $messages = [];
        foreach ($items as $item) {
            $destination = $basename . $this->route($item['transport'], $item['site']);
            $headers = ['content-type' => 'application/json', 'persistent' => 'true'];
            $delay = ($item['run_at'] ?? $now) - $now;
            $top = (int) ($this->config['stomp']['max_priority'] ?? 0);
            // [stomp] queue_type: every queue declared as the daemon does
            // (a quorum queue refuses a SEND that says otherwise).
            if (($this->config['stomp']['queue_type'] ?? 'classic') === 'quorum') {
                $headers['x-queue-type'] = 'quorum';
            }
            if ($top > 0) {
                // As the daemon declares its queues; a delay queue has its own.
                $headers['priority'] = (string) max(0, min($item['priority'], $top));
                if ($delay <= 0) {
                    $headers['x-max-priority'] = (string) $top;
                }
            }
            if ($delay > 0) {
                // Never late: a worker sends one that comes early round again.
                $ttl = self::bucket($delay);
                if ($this->connectStomp() && $this->rabbitmq) {
                    $headers += ['x-message-ttl' => (string) $ttl, 'x-dead-letter-exchange' => '',
                                 'x-dead-letter-routing-key' => substr($destination, strlen('/queue/'))];
                    $destination .= ".retry-{$ttl}ms";
                } else {
                    $headers['AMQ_SCHEDULED_DELAY'] = (string) $ttl;
                }
            }
            $messages[] = [$destination, $item['frame'], $headers];
        }
        $this->sendAll($messages);
    }

    /** Delay (s) → a TTL (ms) of snq's retry queues, rounded down. */
    private static function bucket(float $delay): int
    {
        $ms = max($delay * 1000, 1.0);
        $step = floor(self::STEPS_PER_DOUBLING * log($ms, 2) + 1e-9);
        return (int) min(round(2 ** ($step / self::STEPS_PER_DOUBLING)), self::MAX_TTL);
    }

    /** SEND each [destination, body, headers]; return once the broker confirmed all. */
    private function sendAll(array $messages): void
    {
        $this->connectStomp();
        $out = '';
        $waiting = [];
        foreach ($messages as [$destination, $body, $headers]) {
            $receipt = 'snq-' . ++$this->receipts;
            $waiting[$receipt] = true;
            $out .= self::frame('SEND', ['destination' => $this->wire($destination)]
                + $headers + ['receipt' => $receipt, 'content-length' => (string) strlen($body)], $body);
        }
        $this->write($out);
        while ($waiting) {
            [$command, $headers] = $this->readFrame();
            if ($command === 'RECEIPT') {
                unset($waiting[$headers['receipt-id'] ?? '']);
            }
        }
    }

    /** Connect and log in if not connected; true. */
    private function connectStomp(): bool
    {
        if ($this->connected()) {
            return true;
        }
        $stomp = $this->config['stomp'] ?? [];
        $errors = [];
        foreach ($stomp['servers'] ?? ['tcp://127.0.0.1:61613'] as $server) {
            try {
                $this->open(preg_replace('#^ssl://#', 'tls://', $server),
                    (float) ($stomp['connect_timeout'] ?? 10));
                $this->write(self::frame('CONNECT', [
                    'accept-version' => '1.2', 'host' => $stomp['vhost'] ?? '/',
                    'login' => $stomp['login'] ?? 'guest',
                    'passcode' => $stomp['passcode'] ?? 'guest', 'heart-beat' => '0,0']));
                [, $headers] = $this->readFrame();
                $this->rabbitmq = str_starts_with($headers['server'] ?? '', 'RabbitMQ/');
                $escape = $stomp['escape_slashes'] ?? 'auto';
                $this->escape = $escape === 'always' || ($escape === 'auto' && $this->rabbitmq);
                return true;
            } catch (\Throwable $e) {
                $this->close();
                $errors[] = "$server: " . $e->getMessage();
            }
        }
        throw new \RuntimeException('no STOMP server answers (' . implode('; ', $errors) . ')');
    }

    /** A destination as the broker wants it: RabbitMQ takes "/" inside a name as %2F. */
    private function wire(string $destination): string
    {
        foreach ($this->escape ? self::NAMED : [] as $prefix) {
            if (str_starts_with($destination, $prefix)) {
                return $prefix . str_replace('/', '%2F', substr($destination, strlen($prefix)));
            }
        }
        return $destination;
    }

    private static function frame(string $command, array $headers, string $body = ''): string
    {
        $lines = [$command];
        foreach ($headers as $name => $value) {
            // STOMP 1.2 escapes header text in every frame but CONNECT.
            $lines[] = $command === 'CONNECT' ? "$name:$value"
                : self::escapeHeader((string) $name) . ':' . self::escapeHeader((string) $value);
        }
        return implode("\n", $lines) . "\n\n" . $body . "\0";
    }

    private static function escapeHeader(string $text): string
    {
        return strtr($text, ['\\' => '\\\\', "\r" => '\\r', "\n" => '\\n', ':' => '\\c']);
    }

    /** The next frame as [command, headers, body]; an ERROR frame thrown. */
    private function readFrame(): array
    {
        do {
            $command = $this->readLine();
        } while ($command === '');  // heart-beats
        $headers = [];
        while (($line = $this->readLine()) !== '') {
            [$name, $value] = explode(':', $line, 2) + [1 => ''];
            $decode = ['\\\\' => '\\', '\\r' => "\r", '\\n' => "\n", '\\c' => ':'];
            $headers[strtr($name, $decode)] ??= strtr($value, $decode);
        }
        if (isset($headers['content-length'])) {
            $body = $this->readBytes((int) $headers['content-length']);
            $this->readBytes(1);
        } else {
            $body = stream_get_line($this->socket, 1 << 24, "\0");
        }
        if ($command === 'ERROR') {
            $this->close();
            throw new \RuntimeException('the broker refused: ' . ($headers['message'] ?? '')
                . ($body !== '' && $body !== false ? ': ' . trim($body) : ''));
        }
        return [$command, $headers, $body];
    }

    // -- both ----------------------------------------------------------------

    /** Where an item goes: the most specific breakout, else its group. */
    private function route(string $transport, string $site): string
    {
        $group = $this->config['transports'][$transport]['group']
            ?? self::HANDLER_GROUPS[$transport] ?? 'main';
        $breakouts = $this->config['queue']['breakout'] ?? [];
        foreach (["$group/$transport/$site", "$group/$transport"] as $spec) {
            if (in_array($spec, $breakouts, true)) {
                return $spec;
            }
        }
        return $group;
    }

    /**
     * Run $store; if a connection kept from before failed (the server
     * dropped it meanwhile), once more on a new one.
     */
    private function retried(callable $store): void
    {
        $reused = $this->connected();
        try {
            $store();
        } catch (\Throwable $e) {
            $this->close();
            if (!$reused || !($e instanceof ConnectionLost)) {
                throw $e;
            }
            $store();
        }
    }

    private function connected(): bool
    {
        if ($this->socketPid !== getmypid()) {
            // Forked: the parent's connection is the parent's.
            $this->socket = null;
        }
        return $this->socket !== null && !feof($this->socket);
    }

    private function open(string $address, float $timeout): void
    {
        $socket = @stream_socket_client($address, $errno, $error, $timeout);
        if ($socket === false) {
            throw new \RuntimeException("$address: $error ($errno)");
        }
        stream_set_timeout($socket, (int) $timeout, (int) (fmod($timeout, 1) * 1e6));
        $this->socket = $socket;
        $this->socketPid = getmypid();
    }

    private function write(string $data): void
    {
        for ($sent = 0; $sent < strlen($data); $sent += $n) {
            $n = @fwrite($this->socket, substr($data, $sent));
            if ($n === false || $n === 0) {
                throw new ConnectionLost('connection lost while sending');
            }
        }
    }

    private function readLine(): string
    {
        $line = fgets($this->socket);
        if ($line === false) {
            throw new ConnectionLost($this->timedOut() ? 'no answer in time' : 'connection lost');
        }
        return rtrim($line, "\r\n");
    }

    private function readBytes(int $length): string
    {
        $data = '';
        while (strlen($data) < $length) {
            $chunk = fread($this->socket, $length - strlen($data));
            if ($chunk === false || ($chunk === '' && (feof($this->socket) || $this->timedOut()))) {
                throw new ConnectionLost('connection lost');
            }
            $data .= $chunk;
        }
        return $data;
    }

    private function timedOut(): bool
    {
        return (bool) (stream_get_meta_data($this->socket)['timed_out'] ?? false);
    }

    // -- arguments -------------------------------------------------------------

    private static function checkName(string $what, $name): void
    {
        if (!is_string($name) || $name === '' || str_contains($name, '/') || trim($name) !== $name) {
            throw new \InvalidArgumentException("$what must be a non-empty name without '/' or spaces");
        }
    }

    /** The item's run_at: null for "as soon as possible". */
    private static function due(float $now, array $options): ?float
    {
        $delay = $options['delay'] ?? null;
        $runAt = $options['run_at'] ?? null;
        if ($delay !== null && $runAt !== null) {
            throw new \InvalidArgumentException('give delay or run_at, not both');
        }
        if ($delay !== null) {
            if (!is_int($delay) && !is_float($delay) || $delay < 0 || !is_finite((float) $delay)) {
                throw new \InvalidArgumentException('delay must be seconds, 0 or more');
            }
            return $delay > 0 ? $now + $delay : null;
        }
        if ($runAt instanceof \DateTimeInterface) {
            return (float) $runAt->format('U.u');
        }
        if ($runAt !== null && !is_int($runAt) && !is_float($runAt)) {
            throw new \InvalidArgumentException('run_at must be UNIX seconds or a DateTimeInterface');
        }
        return $runAt === null ? null : (float) $runAt;
    }
}

/** A connection that broke in use: worth one more try on a new one. */
final class ConnectionLost extends \RuntimeException
{
}
