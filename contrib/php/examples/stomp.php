<?php
// Enqueueing from PHP on the STOMP backend, and the signed control channel.
// The manual (docs/producer.rst) shows what lies between "begin" and "end";
// tests/test_php.py runs it all.
require __DIR__ . '/../Snq.php';
$start = microtime(true);

// -- begin --
$snq = new Snq\Producer([
    'queue' => ['backend' => 'stomp',
                'basename' => getenv('SNQ_BASENAME') ?: '/queue/snq/'],
    'stomp' => ['servers' => ['tcp://127.0.0.1:61613'],
                'login' => 'guest', 'passcode' => 'guest', 'vhost' => '/',
                'control_channel' => getenv('SNQ_CONTROL') ?: '/topic/snq/control',
                'control_secret' => getenv('SNQ_CONTROL_SECRET')],
]);

$id = $snq->enqueue('webhook', ['url' => 'https://example.org/hook',
                                'body' => ['event' => 'follow']]);
$later = $snq->enqueueMany('webhook', [['body' => ['n' => 1]], ['body' => ['n' => 2]]],
                           ['delay' => 2]);
// -- end --

// -- begin control --
// Every worker reloads the config (signed: the daemon has the same secret).
$snq->control('update:default');
// -- end control --

echo json_encode(['handled' => [$id, ...$later], 'delayed' => $later,
                  'notBefore' => $start + 2, 'undone' => []]), "\n";
